"""The Llama mapping alone: gigatrain's weights, renamed and with the rotary permutation, make
transformers' own LlamaForCausalLM compute the same logits, and map back bit for bit."""

import pytest
import torch
import transformers

from gigatrain.config import ConfigError
from gigatrain.interop.llama import from_hf, hf_config, model_args_from_hf, to_hf
from gigatrain.models.transformer import ModelArgs, Transformer


def hf_model(args: ModelArgs) -> transformers.LlamaForCausalLM:
    config = hf_config(args, bos_token_id=0, eos_token_id=0, dtype=torch.float32)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_mapped_weights_give_transformers_the_same_logits_and_map_back_exactly(tie):
    args = ModelArgs(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=300,
                     max_seq_len=128, rope_theta=500000.0, tie_embeddings=tie)
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
