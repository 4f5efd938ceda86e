"""train.float8: which linear layers convert (a pure rule, tested without torchao), and the
refusal where float8 cannot run. The float8 training itself runs on a GPU (bench/gpu.py)."""

import dataclasses

import pytest
import torch

from gigatrain.cli import run as cli_run
from gigatrain.models.presets import get_preset
from gigatrain.models.transformer import Transformer
from gigatrain.parallel.float8 import converts_to_float8, float8_linear_names
from helpers import TINY


def _model(**overrides) -> Transformer:
    with torch.device("meta"):
        return Transformer(dataclasses.replace(get_preset("tiny"), **overrides))


def test_every_block_linear_converts_but_the_head():
    names = float8_linear_names(_model(tie_embeddings=False))
    per_block = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"]
    assert names == [f"layers.{i}.{name}" for i in range(2) for name in per_block]


def test_linears_with_a_dimension_not_divisible_by_16_stay_in_bf16():
    # ffn_hidden 200 = 12.5 x 16: the feed-forward's three matrices keep bf16 matmuls; a head
    # dimension of 8 (32 / 4 heads) with 1 kv head makes wk and wv 32 x 8: out_features 8.
    names = float8_linear_names(_model(ffn_hidden=200, d_model=32, n_heads=4, n_kv_heads=1))
    assert names == [f"layers.{i}.attention.{name}" for i in range(2) for name in ("wq", "wo")]


def test_a_router_stays_in_bf16_whatever_its_size():
    gate = torch.nn.Linear(64, 64, bias=False)
    assert not converts_to_float8(gate, "layers.0.feed_forward.router.gate")
    assert converts_to_float8(gate, "layers.0.feed_forward.shared_experts.w1")
    assert not converts_to_float8(torch.nn.Embedding(64, 64), "tok_embeddings")


def test_float8_without_a_gpu_is_one_config_error(byte_data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    code = cli_run(["train", *TINY, f"--data.path={byte_data}", f"--run.dir={tmp_path / 'run'}",
                    "--train.max_steps=1", "--train.float8=true", "--train.float8_recipe=rowwise"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "train.float8=true needs a CUDA GPU" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_an_unknown_float8_recipe_is_refused(byte_data, tmp_path, capsys):
    code = cli_run(["train", *TINY, f"--data.path={byte_data}", f"--run.dir={tmp_path / 'run'}",
                    "--train.float8_recipe=blockwise"])
    assert code == 2 and "train.float8_recipe='blockwise' is not valid" in capsys.readouterr().err
