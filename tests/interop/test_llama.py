"""The Llama mapping alone: gigatrain's weights, renamed and with the rotary permutation, make
transformers' own LlamaForCausalLM compute the same logits, and map back bit for bit."""

import dataclasses

import pytest
import torch
import transformers

from gigatrain.config import ConfigError
from gigatrain.interop.llama import from_hf, hf_config, model_args_from_hf, to_hf
from gigatrain.models.transformer import ModelArgs, Transformer, rope_frequencies


def hf_model(args: ModelArgs) -> transformers.LlamaForCausalLM:
    config = hf_config(args, bos_token_id=0, eos_token_id=0, dtype=torch.float32)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_mapped_weights_give_transformers_the_same_logits_and_map_back_exactly(tie):
    args = ModelArgs(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=300,
                     max_seq_len=128, rope_theta=500000.0, tie_embeddings=tie,
                     **({"rope_scaling_factor": 8.0, "rope_original_max_seq_len": 32} if tie else {}))
    ours = Transformer(args, seed=1).eval()
    exported = dict(to_hf(name, tensor, args) for name, tensor in ours.state_dict().items()
                    if not (tie and name == "output.weight"))  # tied: one matrix, stored once
    theirs = hf_model(args)
    result = theirs.load_state_dict(exported, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == (["lm_head.weight"] if tie else [])
    tokens = torch.randint(0, args.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), theirs(tokens).logits, atol=1e-5, rtol=0)
    back = dict(from_hf(name, tensor, args) for name, tensor in exported.items())
    for name, tensor in ours.state_dict().items():
        if name in back:
            assert torch.equal(back[name], tensor), name
    assert model_args_from_hf(hf_config(args, bos_token_id=0, eos_token_id=0, dtype=torch.float32), "config.json") == args


@pytest.mark.parametrize("change, words", [({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
                                           ({"attention_bias": True}, "attention_bias=True"),
                                           ({"head_dim": 32}, "head_dim=32")])
def test_what_gigatrain_cannot_represent_is_one_clear_error(change, words):
    args = ModelArgs(n_layers=1, d_model=64, n_heads=4, n_kv_heads=4, ffn_hidden=96, vocab_size=300, max_seq_len=64)
    config = {**hf_config(args, bos_token_id=None, eos_token_id=None, dtype=torch.float32), **change}
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
    for saved in (config.to_dict(), {**hf_config(model_args_from_hf(config.to_dict(), "config.json"), bos_token_id=0,
                                                 eos_token_id=0, dtype=torch.float32)}):
        args = model_args_from_hf(saved, "config.json")
        assert (args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                args.rope_original_max_seq_len, args.max_seq_len) == (8.0, 1.0, 4.0, 64, 1024)
    ours = Transformer(args).eval()
    ours.load_state_dict(dict(from_hf(name, tensor, args) for name, tensor in theirs.state_dict().items()))
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
    config = {**hf_config(args, bos_token_id=None, eos_token_id=None, dtype=torch.float32),
              "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}
    with pytest.raises(ConfigError, match="rope_type 'yarn' is not supported"):
        model_args_from_hf(config, "config.json")
