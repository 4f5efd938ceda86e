"""The model options of mixtures of experts and Grok/Qwen attention, checked before start-up:
one line naming the bad value, exit 2 from the command line."""

import pytest

from gigatrain.cli import run as cli_run
from gigatrain.config import ConfigError, load_config

MOE = "--model.preset=tiny-moe"


@pytest.mark.parametrize("overrides, words", [
    ([MOE, "--model.n_experts=-1"], ["model.n_experts=-1", "0 or more"]),
    ([MOE, "--model.top_k=0"], ["model.top_k=0", "between 1 and model.n_experts=8"]),
    ([MOE, "--model.top_k=9"], ["model.top_k=9", "between 1 and model.n_experts=8"]),
    ([MOE, "--model.router_score=tanh"], ["model.router_score='tanh'", "softmax or sigmoid"]),
    ([MOE, "--model.mlp_activation=relu"], ["model.mlp_activation='relu'", "silu, gelu or relu2"]),
    ([MOE, "--model.moe_every=0"], ["model.moe_every=0", "at least 1"]),
    ([MOE, "--model.n_dense_layers=2"], ["model.n_dense_layers=2", "model.n_layers=2"]),
    ([MOE, "--model.aux_loss_coef=-0.01"], ["model.aux_loss_coef=-0.01", "0 or more"]),
    ([MOE, "--model.bias_update_rate=-1"], ["model.bias_update_rate=-1", "0 or more"]),
    (["--model.attn_softcap=-30"], ["model.attn_softcap=-30", "0 or more"]),
    (["--model.attn_softcap=30", "--parallel.cp=2"], ["model.attn_softcap=30", "parallel.cp=1"]),
    (["--model.head_dim_override=-2"], ["model.head_dim_override=-2"]),
    (["--model.head_dim_override=17"], ["head dimension 17", "even"]),
])
def test_bad_model_options_are_refused_in_one_line(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_top_k_is_free_for_a_dense_model_and_a_wide_head_needs_no_divisible_d_model():
    load_config(None, ["--model.preset=tiny", "--model.top_k=5"])  # n_experts 0: top_k unused
    load_config(None, ["--model.preset=tiny", "--model.n_heads=3", "--model.n_kv_heads=1", "--model.head_dim_override=32"])


@pytest.mark.parametrize("overrides, words", [
    (["--model.top_k=9"], ["model.top_k=9"]),
    (["--model.router_score=tanh"], ["model.router_score"]),
])
def test_command_line_exits_2_with_one_line(overrides, words, tmp_path, capsys):
    code = cli_run(["train", MOE, *overrides, f"--run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0]


def test_dry_run_prints_total_and_active_parameters(capsys):
    assert cli_run(["train", "--model.preset=mixtral-8x7b", "--data.tokenizer=byte", "--dry-run", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    # param_counts of the published shape: 46.70B in all, 12.88B through which one token goes.
    assert "8 experts, 2 per token: 46,702.8M in all, 12,879.9M active" in out, out
