import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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


def write_corpus(folder: Path, n_files: int = 24, offset: int = 0) -> Path:
    """A small corpus of real Python source: standard-library files, present on every machine."""
    from gigatrain.data.prepare import default_corpus_files

    folder.mkdir(parents=True, exist_ok=True)
    files = [f for f in default_corpus_files() if 2_000 < f.stat().st_size < 12_000][offset : offset + n_files]
    for i, path in enumerate(files):
        (folder / f"doc{i:03d}_{path.name}").write_text(path.read_text(encoding="utf-8", errors="replace"))
    return folder


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


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m gigatrain ARGS` in a subprocess, as a user would run it."""
    result = subprocess.run([sys.executable, "-m", "gigatrain", *args], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"gigatrain {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


TINY = ["--model.preset=tiny", "--data.seq_len=64", "--train.batch_size=8", "--train.eval_batches=2",
        "--train.samples=0", "--train.progress=plain", "--train.warmup_steps=2"]
