"""The mappings alone (Llama, Qwen3, Mixtral, Qwen3-MoE): gigatrain's weights, renamed, with the
rotary permutation and the experts split per expert, make transformers' own models compute the
same logits, and map back bit for bit; random transformers models mapped into gigatrain
compute their logits; what an architecture cannot express is one clear error."""

import dataclasses

import pytest
import torch
import transformers

from gigatrain.config import ConfigError
from gigatrain.interop.mapping import (LLAMA, MIXTRAL, QWEN3, QWEN3_MOE, check_expert_bias, family_for, from_hf,
                                       hf_config, model_args_from_hf, to_hf)
from gigatrain.models.transformer import ModelArgs, Transformer, rope_frequencies

CONFIG_CLASSES = {LLAMA: transformers.LlamaConfig, QWEN3: transformers.Qwen3Config,
                  MIXTRAL: transformers.MixtralConfig, QWEN3_MOE: transformers.Qwen3MoeConfig}
MOE = dict(n_experts=4, top_k=2, expert_hidden=48)


def exported(model: Transformer, args: ModelArgs, family) -> dict:
    return {hf: tensor for name, tensor in model.state_dict().items()
            if not (args.tie_embeddings and name == "output.weight")  # tied: one matrix, stored once
            for hf, tensor in to_hf(name, tensor, args, family)}


def imported(state: dict, args: ModelArgs, family) -> dict:
    """A transformers state dict as gigatrain's (stacked experts assembled slot by slot)."""
    out = {}
    for hf, tensor in state.items():
        for name, expert, part in from_hf(hf, tensor, args, family):
            if expert is None:
                out[name] = part
            else:
                out.setdefault(name, {})[expert] = part
    return {name: torch.stack([v[e] for e in sorted(v)]) if isinstance(v, dict) else v for name, v in out.items()}


def hf_model(args: ModelArgs, family):
    config = hf_config(args, family, bos_token_id=0, eos_token_id=0, dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_config(CONFIG_CLASSES[family](**config)).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_mapped_weights_give_transformers_the_same_logits_and_map_back_exactly(tie):
    args = ModelArgs(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=300,
                     max_seq_len=128, rope_theta=500000.0, tie_embeddings=tie,
                     **({"rope_scaling_factor": 8.0, "rope_original_max_seq_len": 32} if tie else {}))
    assert family_for(args) is LLAMA
    ours = Transformer(args, seed=1).eval()
    weights = exported(ours, args, LLAMA)
    theirs = hf_model(args, LLAMA)
    result = theirs.load_state_dict(weights, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == (["lm_head.weight"] if tie else [])
    tokens = torch.randint(0, args.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), theirs(tokens).logits, atol=1e-5, rtol=0)
    back = imported(weights, args, LLAMA)
    for name, tensor in ours.state_dict().items():
        if name in back:
            assert torch.equal(back[name], tensor), name
    assert model_args_from_hf(hf_config(args, LLAMA, bos_token_id=0, eos_token_id=0, dtype=torch.float32),
                              "config.json") == (args, LLAMA)


def random_hf(family, **config):
    """A random transformers model of `family`, its router weights wide enough that no two experts
    tie within rounding (a near tie could pick different experts in the two implementations)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIG_CLASSES[family](
        vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, tie_word_embeddings=False, **config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gate.weight"):
                param.normal_(0, 0.5)
    return model


CASES = {
    "qwen3": (QWEN3, dict(intermediate_size=96, num_hidden_layers=2, head_dim=32)),
    "mixtral": (MIXTRAL, dict(intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                              router_aux_loss_coef=0.02)),
    # a dense first layer, experts not renormalised, heads wider than hidden_size / heads
    "qwen3-moe": (QWEN3_MOE, dict(intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=3, num_experts=4,
                                  num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=False, head_dim=32)),
}


@pytest.mark.parametrize("case", CASES)
def test_random_transformers_models_mapped_into_gigatrain_compute_their_logits(case):
    """From transformers' in-memory state dict (fused experts, gate_up_proj) into gigatrain; then
    out again per expert (the hub's layout) and back, bit for bit."""
    family, config = CASES[case]
    theirs = random_hf(family, **config)
    args, mapped_family = model_args_from_hf(theirs.config.to_dict(), "config.json")
    assert mapped_family is family and family_for(args) is family
    if family is QWEN3_MOE:
        assert (args.n_dense_layers, args.moe_every, args.route_norm, args.head_dim) == (1, 1, False, 32)
    if family is MIXTRAL:
        assert (args.n_experts, args.top_k, args.moe_hidden, args.aux_loss_coef) == (4, 2, 48, 0.02)
    ours = Transformer(args).eval()
    result = ours.load_state_dict(imported(theirs.state_dict(), args, family), strict=False)
    assert result.unexpected_keys == [] and all(k.endswith("expert_bias") for k in result.missing_keys)
    tokens = torch.randint(0, 300, (2, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), theirs(tokens).logits, atol=1e-4, rtol=0)
    per_expert = exported(ours, args, family)
    if family.moe_block:  # the hub's names, one tensor per expert
        assert f"model.layers.1.{family.moe_block}.experts.3.{family.expert_names[1]}.weight" in per_expert
        assert not any("gate_up_proj" in name for name in per_expert)
    back = imported(per_expert, args, family)
    assert back.keys() == {n for n in ours.state_dict() if not n.endswith("expert_bias")}
    assert all(torch.equal(back[name], tensor) for name, tensor in ours.state_dict().items() if name in back)
    # and the config written for it maps back to the same shape
    assert model_args_from_hf(hf_config(args, family, bos_token_id=0, eos_token_id=0, dtype=torch.float32),
                              "config.json") == (args, family)


def test_qk_norm_gains_are_permuted_like_a_head_of_queries():
    """Gains that differ feature by feature (transformers' are all ones at init): wrong pairing
    would scale the wrong features and change the logits."""
    theirs = random_hf(QWEN3, intermediate_size=96, num_hidden_layers=1, head_dim=16)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 2.0)
    args, family = model_args_from_hf(theirs.config.to_dict(), "config.json")
    ours = Transformer(args).eval()
    ours.load_state_dict(imported(theirs.state_dict(), args, family))
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), theirs(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, words", [
    ({"attn_softcap": 30.0}, "model.attn_softcap=30.0: MixtralForCausalLM does not cap"),
    ({"mlp_activation": "gelu"}, "model.mlp_activation=gelu"),
    ({"router_score": "sigmoid"}, "model.router_score=sigmoid"),
    ({"n_shared_experts": 1}, "model.n_shared_experts=1: MixtralForCausalLM has no shared experts"),
    ({"route_norm": False}, "model.route_norm=false"),
    ({"n_dense_layers": 1}, "model.n_dense_layers=1 and model.moe_every=1: every MixtralForCausalLM layer is MoE"),
    ({"moe_every": 2}, "--model.n_dense_layers=0 --model.moe_every=1"),
    ({"qk_norm": True, "n_shared_experts": 2}, "Qwen3MoeForCausalLM has no shared experts"),
    ({"attn_softcap": 50.0, "n_experts": 0}, "LlamaForCausalLM does not cap"),
    ({"logit_softcap": 15.0, "n_experts": 0}, "model.logit_softcap=15.0: LlamaForCausalLM does not cap its output"),
    ({"mlp_activation": "relu2", "n_experts": 0, "qk_norm": True}, "model.mlp_activation=relu2: Qwen3ForCausalLM"),
])
def test_what_an_architecture_cannot_express_is_refused_on_export(change, words):
    args = ModelArgs(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=300, max_seq_len=64,
                     **{**MOE, **change})
    with pytest.raises(ConfigError, match=words):
        family_for(args)


def test_qwen3_moe_expresses_dense_layers_and_unnormalised_routing():
    args = ModelArgs(n_layers=5, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=300, max_seq_len=64,
                     qk_norm=True, n_dense_layers=1, moe_every=2, route_norm=False, **MOE)
    assert family_for(args) is QWEN3_MOE
    config = hf_config(args, QWEN3_MOE, bos_token_id=0, eos_token_id=0, dtype=torch.float32)
    assert config["mlp_only_layers"] == [0, 2, 4] and config["norm_topk_prob"] is False
    assert model_args_from_hf(config, "config.json") == (args, QWEN3_MOE)


def test_a_non_zero_expert_bias_is_refused():
    check_expert_bias("layers.0.feed_forward.router.expert_bias", torch.zeros(4))
    with pytest.raises(ConfigError, match=r"expert_bias is non-zero .*--model.bias_update_rate=0"):
        check_expert_bias("layers.0.feed_forward.router.expert_bias", torch.tensor([0.0, 0.01, 0.0, 0.0]))


@pytest.mark.parametrize("change, words", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 4,
      "num_experts_per_tok": 2, "sliding_window": 4096}, "sliding_window=4096"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 48, "num_hidden_layers": 3, "mlp_only_layers": [2]}, r"MoE layers \[0, 1\]"),
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, "not a complete MixtralForCausalLM config"),
])
def test_what_gigatrain_cannot_represent_is_one_clear_error(change, words):
    args = ModelArgs(n_layers=1, d_model=64, n_heads=4, n_kv_heads=4, ffn_hidden=96, vocab_size=300, max_seq_len=64)
    config = {**hf_config(args, LLAMA, bos_token_id=None, eos_token_id=None, dtype=torch.float32), **change}
    with pytest.raises(ConfigError, match=words):
        model_args_from_hf(config, "config.json")


def test_llama3_rope_scaling_from_transformers_gives_its_logits_at_short_and_long_positions():
    """Llama 3.1's rotary scaling, tiny: pretrained at 64 positions, stretched to 1024. A random
    transformers model mapped into gigatrain computes its logits beyond the original context too."""
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    for saved in (config.to_dict(), hf_config(model_args_from_hf(config.to_dict(), "config.json")[0], LLAMA,
                                              bos_token_id=0, eos_token_id=0, dtype=torch.float32)):
        args, _ = model_args_from_hf(saved, "config.json")
        assert (args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                args.rope_original_max_seq_len, args.max_seq_len) == (8.0, 1.0, 4.0, 64, 1024)
    ours = Transformer(args).eval()
    ours.load_state_dict(imported(theirs.state_dict(), args, LLAMA))
    # Both conventions compute the same scaled frequencies (transformers in float32).
    hf_freqs = theirs.model.rotary_emb.inv_freq.double()
    assert torch.allclose(rope_frequencies(args), hf_freqs, rtol=1e-6, atol=0)
    assert not torch.allclose(rope_frequencies(dataclasses.replace(args, rope_scaling_factor=1.0)), hf_freqs)
    tokens = torch.randint(0, args.vocab_size, (1, 1000), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(tokens)
        expected = theirs(tokens).logits
    assert torch.allclose(logits[:, :64], expected[:, :64], atol=1e-4, rtol=0)
    assert torch.allclose(logits[:, 64:], expected[:, 64:], atol=1e-4, rtol=0)


def test_an_unsupported_rope_type_is_one_clear_error():
    args = ModelArgs(n_layers=1, d_model=64, n_heads=4, n_kv_heads=4, ffn_hidden=96, vocab_size=300, max_seq_len=64)
    config = {**hf_config(args, LLAMA, bos_token_id=None, eos_token_id=None, dtype=torch.float32),
              "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}
    with pytest.raises(ConfigError, match="rope_type 'yarn' is not supported"):
        model_args_from_hf(config, "config.json")
