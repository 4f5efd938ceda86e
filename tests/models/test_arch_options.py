"""The architecture options of the time-to-quality recipe (squared-ReLU MLP, output-logit
soft-capping, zero-initialised residual projections) and the parameter roles an optimizer
groups by: their math against a written-out reference, their parameter and FLOP counts by
hand and against the module, their checks before start-up. Each is off by default.
(Under every parallel layout and through a checkpoint reshard: tests/parallel/test_layouts.py.)"""

import pytest
import torch
import torch.nn.functional as F

from gigatrain.cli import run as cli_run
from gigatrain.config import ConfigError, load_config
from gigatrain.models.flops import param_counts, training_flops_per_token
from gigatrain.models.presets import PRESETS, get_preset, with_overrides
from gigatrain.models.transformer import ModelArgs, Transformer, parameter_groups, parameter_role

TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def test_every_option_is_off_by_default_but_where_the_default_recipe_measured_it():
    args = ModelArgs(n_layers=1, d_model=8, n_heads=2, n_kv_heads=1, ffn_hidden=16, vocab_size=300, max_seq_len=8)
    assert (args.mlp_activation, args.logit_softcap, args.zero_init_residual) == ("silu", 0.0, False)
    assert all(p.mlp_activation != "relu2" and not p.logit_softcap for p in PRESETS.values())
    # Zero-initialised residual projections: cpu-small's recipe only (docs/training.md, "The default recipe").
    assert [name for name, p in PRESETS.items() if p.zero_init_residual] == ["cpu-small"]


# -- squared-ReLU MLP ---------------------------------------------------------------------

def test_squared_relu_mlp_is_w2_of_relu_w1x_squared_with_no_up_projection():
    model = Transformer(with_overrides(get_preset("tiny"), mlp_activation="relu2"), seed=1)
    mlp = model.layers["0"].feed_forward
    assert mlp.w3 is None and not any(".w3." in name for name in model.state_dict())
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    expected = (x @ mlp.w1.weight.T).clamp(min=0).pow(2) @ mlp.w2.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)


def test_squared_relu_counts_two_matrices_by_hand_and_as_built():
    # tiny: L=2, d=64, ffn=192: the MLP is w1 and w2, 2 * 64 * 192 = 24_576 (gated: 36_864).
    args = with_overrides(get_preset("tiny"), mlp_activation="relu2")
    assert param_counts(args).mlp == 2 * 64 * 192
    assert param_counts(args).total == param_counts(get_preset("tiny")).total - 2 * 64 * 192 == 90_432
    # 2 layers x 64 x 192 matmul parameters fewer per token: 6 of FLOPs each.
    assert training_flops_per_token(args, 128) == 884_736 - 6 * 2 * 64 * 192 == 737_280
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == param_counts(args).total


def test_gated_paths_unchanged():
    """silu and gelu keep w3: the default model's numbers are not touched by relu2's branch."""
    model = Transformer(get_preset("tiny"), seed=1)
    mlp = model.layers["0"].feed_forward
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(mlp(x), mlp.w2(F.silu(mlp.w1(x)) * mlp.w3(x)), rtol=0, atol=0)


# -- output-logit soft-capping ---------------------------------------------------------------

def test_logit_softcap_is_c_tanh_of_the_uncapped_logits_in_fp32():
    plain = Transformer(get_preset("tiny"), seed=4)
    capped = Transformer(with_overrides(get_preset("tiny"), logit_softcap=0.5), seed=4)
    # The same parameters (the cap has none); a cap of 0.5 bites on the largest init-sized logits (up to 1.5).
    assert param_counts(capped.args) == param_counts(plain.args)
    torch.testing.assert_close(capped.state_dict(), plain.state_dict(), rtol=0, atol=0)
    logits, reference = capped(TOKENS), plain(TOKENS)
    assert logits.dtype == torch.float32 and logits.abs().max() < 0.5
    assert reference.abs().max() > 1.0  # so the cap changed something
    torch.testing.assert_close(logits, 0.5 * torch.tanh(reference / 0.5), rtol=1e-6, atol=1e-7)


def test_logit_softcap_keeps_bf16_models_logits_in_fp32():
    capped = Transformer(with_overrides(get_preset("tiny"), logit_softcap=15.0), seed=4).to(torch.bfloat16)
    assert capped(TOKENS).dtype == torch.float32


def test_logit_softcap_gradient_is_the_chain_rule():
    capped = Transformer(with_overrides(get_preset("tiny"), logit_softcap=0.5), seed=4)
    plain = Transformer(get_preset("tiny"), seed=4)
    probe = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(5))
    (capped(TOKENS) * probe).sum().backward()
    reference = plain(TOKENS)
    # d(c tanh(z / c))/dz = 1 - tanh(z / c)^2
    (reference * probe * (1 - torch.tanh(reference.detach() / 0.5) ** 2)).sum().backward()
    for (name, got), (_, expected) in zip(capped.named_parameters(), plain.named_parameters()):
        # To fp32 rounding of the sums, relative to the tensor's largest gradient.
        scale = expected.grad.abs().max().item()
        assert scale > 0 and (got.grad - expected.grad).abs().max().item() <= 1e-5 * scale, name


# -- zero-initialised residual projections ------------------------------------------------------

ZEROED = ("attention.wo.weight", "feed_forward.w2.weight", "experts.w2", "shared_experts.w2.weight")


@pytest.mark.parametrize("preset, overrides", [("tiny", {}), ("tiny-moe", {"n_shared_experts": 1})])
def test_zero_init_residual_zeroes_the_output_projections_only(preset, overrides):
    args = with_overrides(get_preset(preset), **overrides)
    plain = Transformer(args, seed=7)
    zeroed = Transformer(with_overrides(args, zero_init_residual=True), seed=7)
    names = [name for name, _ in zeroed.named_parameters() if name.endswith(ZEROED)]
    # Per layer: wo and the MLP's (or the experts' and the shared experts') w2.
    assert len(names) == args.n_layers * (3 if args.is_moe else 2)
    reference = dict(plain.named_parameters())
    for name, param in zeroed.named_parameters():
        if name in names:
            assert torch.count_nonzero(param) == 0, name
        else:  # each parameter draws from its own stream: the others are untouched
            assert torch.equal(param, reference[name]), name


def test_zero_init_residual_blocks_start_as_the_identity_and_learn():
    model = Transformer(with_overrides(get_preset("tiny"), tie_embeddings=False, zero_init_residual=True), seed=7)
    logits = model(TOKENS)
    torch.testing.assert_close(logits, model.output(model.norm(model.tok_embeddings(TOKENS))), rtol=0, atol=0)
    F.cross_entropy(logits.flatten(0, 1), TOKENS.roll(-1, 1).flatten()).backward()
    grads = dict((name, p.grad) for name, p in model.named_parameters())
    # The zeroed matrices get gradients at once; those behind them only once they are nonzero.
    assert grads["layers.0.attention.wo.weight"].abs().sum() > 0
    assert grads["layers.1.feed_forward.w2.weight"].abs().sum() > 0
    assert grads["layers.0.attention.wq.weight"].abs().sum() == 0


# -- parameter roles for per-group learning rates ---------------------------------------------

def test_parameter_groups_classify_every_parameter_once():
    model = Transformer(with_overrides(get_preset("tiny"), tie_embeddings=False, qk_norm=True))
    groups = parameter_groups(model)
    names = {role: [name for name, _ in members] for role, members in groups.items()}
    assert names["embed"] == ["tok_embeddings.weight"] and names["head"] == ["output.weight"]
    assert names["router"] == []
    assert sorted(names["vector"]) == sorted(n for n, p in model.named_parameters() if n.endswith("norm.weight"))
    assert len(names["matrix"]) == 2 * 7  # per layer: wq, wk, wv, wo, w1, w3, w2
    assert sorted(n for members in names.values() for n in members) == sorted(n for n, _ in model.named_parameters())


def test_parameter_groups_tied_head_is_the_embedding_and_moe_router_is_apart():
    tied = parameter_groups(Transformer(get_preset("tiny")))
    assert [n for n, _ in tied["embed"]] == ["tok_embeddings.weight"] and tied["head"] == []
    moe = parameter_groups(Transformer(get_preset("tiny-moe")))
    assert [n for n, _ in moe["router"]] == ["layers.0.feed_forward.router.gate.weight", "layers.1.feed_forward.router.gate.weight"]
    assert "layers.0.feed_forward.experts.w1" in [n for n, _ in moe["matrix"]]


def test_parameter_role_reads_wrapped_names():
    """FSDP keeps names; torch.compile and activation checkpointing add prefixes and infixes."""
    matrix = torch.empty(4, 4)
    assert parameter_role("_orig_mod.tok_embeddings.weight", matrix) == "embed"
    assert parameter_role("_orig_mod.output.weight", matrix) == "head"
    assert parameter_role("layers.3._checkpoint_wrapped_module.attention.wo.weight", matrix) == "matrix"
    assert parameter_role("layers.3._checkpoint_wrapped_module.ffn_norm.weight", torch.empty(4)) == "vector"


# -- checks before start-up ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (["--model.logit_softcap=-15"], ["model.logit_softcap=-15", "0 or more"]),
    (["--model.mlp_activation=relu3"], ["model.mlp_activation='relu3'", "silu, gelu or relu2"]),
    (["--model.preset=tiny-moe", "--model.mlp_activation=relu2"], ["model.mlp_activation=relu2", "model.n_experts=8", "silu or gelu"]),
    (["--model.zero_init_residual=maybe"], ["model.zero_init_residual"]),
])
def test_bad_options_are_refused_in_one_line(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_command_line_exits_2_with_one_line(tmp_path, capsys):
    code = cli_run(["train", "--model.logit_softcap=-1", f"--run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "model.logit_softcap=-1" in lines[0]
