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
