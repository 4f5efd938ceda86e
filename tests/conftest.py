import os
from pathlib import Path

import pytest

from helpers import write_corpus


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tests never touch the user's ~/.cache/gigatrain (prepared default corpus, CPU peak)."""
    cache = tmp_path_factory.mktemp("gigatrain-cache")
    old = os.environ.get("GIGATRAIN_CACHE")
    os.environ["GIGATRAIN_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("GIGATRAIN_CACHE", None)
    else:
        os.environ["GIGATRAIN_CACHE"] = old


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "train")


@pytest.fixture(scope="session")
def heldout(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("heldout") / "val", n_files=4, offset=100)


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory, corpus, heldout) -> Path:
    from gigatrain.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "byte"
    prepare([str(corpus)], out, val_sources=[str(heldout)], tokenizer="byte")
    return out


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory, corpus, heldout) -> Path:
    from gigatrain.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "bpe"
    prepare([str(corpus)], out, val_sources=[str(heldout)], tokenizer="bpe", vocab_size=512)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, byte_data) -> Path:
    """A finished tiny run of 8 steps with its checkpoint (enough steps for `plan --calibrate`):
    what eval, generate and report read."""
    import contextlib
    import io

    from gigatrain.cli import run
    from helpers import TINY

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    with contextlib.redirect_stdout(io.StringIO()):
        code = run(["train", *TINY, f"--data.path={byte_data}", f"--run.dir={run_dir}", "--train.max_steps=8",
                    "--train.eval_every=8", "--train.checkpoint_every=8"])
    assert code == 0
    return run_dir
