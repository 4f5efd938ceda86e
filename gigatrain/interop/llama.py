"""gigatrain's Transformer <-> transformers' LlamaForCausalLM: parameter names, the rotary
permutation and config.json. Pure functions on names, tensors and dicts; reading and writing
files is export.py's and importer.py's.

The rotary permutation: gigatrain rotates consecutive pairs of each head's query and key
features, (x0, x1), (x2, x3), ... (the Meta / torchtitan convention); transformers' Llama rotates
the two halves, (x0, x_{d/2}), (x1, x_{d/2+1}), ... Pair i turns by the same angle in both, so the
same model in the other convention is the same weights with each head's rows of wq and wk
reordered: gigatrain's rows [0e, 0o, 1e, 1o, ...] become [0e, 1e, ..., 0o, 1o, ...]. Values and
every other matrix are untouched, so the permutation is exact in any dtype.
"""

from __future__ import annotations

import re

import torch

from gigatrain.config import ConfigError
from gigatrain.models.transformer import ModelArgs

ARCHITECTURE = "LlamaForCausalLM"

# gigatrain name -> transformers name; {i} is the layer index.
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_OURS = re.compile(r"layers\.(\d+)\.(.+)")
_THEIRS = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_NAMES_BACK = {hf: ours for ours, hf in _LAYER_NAMES.items()}
_GLOBAL_NAMES_BACK = {hf: ours for ours, hf in _GLOBAL_NAMES.items()}


def hf_name(name: str) -> str:
    """transformers' name of the gigatrain parameter `name` (as in a one-process state dict)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _OURS.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise KeyError(f"no Llama name for gigatrain parameter {name!r}")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def gigatrain_name(name: str) -> str | None:
    """gigatrain's name of the transformers parameter `name`; None for what gigatrain computes
    instead of storing (rotary inverse frequencies that older checkpoints saved)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name in _GLOBAL_NAMES_BACK:
        return _GLOBAL_NAMES_BACK[name]
    match = _THEIRS.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_NAMES_BACK:
        raise KeyError(name)
    return f"layers.{match.group(1)}.{_LAYER_NAMES_BACK[match.group(2)]}"


def _heads_of(name: str, args: ModelArgs) -> int | None:
    """How many heads a rotated projection's rows hold (None: not rotated)."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One gigatrain parameter as transformers stores it."""
    heads = _heads_of(name, args)
    if heads is not None:  # each head's rows: consecutive pairs -> halves
        tensor = tensor.reshape(heads, args.head_dim // 2, 2, -1).transpose(1, 2).reshape(tensor.shape)
    return hf_name(name), tensor


def from_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor] | None:
    """One transformers parameter as gigatrain stores it (None: nothing to store)."""
    ours = gigatrain_name(name)
    if ours is None:
        return None
    heads = _heads_of(ours, args)
    if heads is not None:  # halves -> consecutive pairs
        tensor = tensor.reshape(heads, 2, args.head_dim // 2, -1).transpose(1, 2).reshape(tensor.shape)
    return ours, tensor


def hf_config(args: ModelArgs, *, bos_token_id: int | None, eos_token_id: int | None, dtype: torch.dtype) -> dict:
    """config.json of LlamaForCausalLM for a model of this shape."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": args.d_model,
        "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        # The legacy key of Llama 3.1's own config.json files, which transformers 5 still reads.
        "rope_scaling": {"rope_type": "llama3", "factor": args.rope_scaling_factor,
                         "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                         "original_max_position_embeddings": args.rope_original_max_seq_len} if args.rope_scaled else None,
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def model_args_from_hf(config: dict, source: str) -> ModelArgs:
    """The ModelArgs of a transformers Llama config.json; one clear line for what gigatrain
    cannot represent (`source` names the file in the message)."""
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    if architectures[0] != ARCHITECTURE and config.get("model_type") != "llama":
        raise ConfigError(f"{source}: architecture {architectures[0]} is not supported; gigatrain imports "
                          f"{ARCHITECTURE} (Llama 2 and 3 families)")
    unsupported = {key: config[key] for key in ("attention_bias", "mlp_bias") if config.get(key)}
    if config.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = config["hidden_act"]
    if unsupported:
        raise ConfigError(f"{source}: {', '.join(f'{k}={v}' for k, v in unsupported.items())} is not supported; "
                          f"gigatrain's Llama has no biases and a SwiGLU (silu) MLP")
    rope = _rope_options(config, source)
    try:
        n_heads = int(config["num_attention_heads"])
        d_model = int(config["hidden_size"])
        args = ModelArgs(
            n_layers=int(config["num_hidden_layers"]),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            ffn_hidden=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
            norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            **rope,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{source}: not a complete Llama config ({type(err).__name__}: {err})") from None
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) != args.head_dim:
        raise ConfigError(f"{source}: head_dim={head_dim} differs from hidden_size/num_attention_heads="
                          f"{args.head_dim}; gigatrain's heads split d_model evenly")
    return args


def _rope_options(config: dict, source: str) -> dict:
    """The ModelArgs rotary fields of a config.json: rope_theta, and Llama 3.1's "llama3" scaling,
    from the legacy `rope_scaling` (Llama 3.1's own files) or transformers 5's `rope_parameters`."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling={scaling!r} is not a dict of rotary parameters")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    partial = scaling.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor={partial} is not supported; gigatrain rotates every "
                          f"feature of each head")
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"{source}: rope_type {rope_type!r} is not supported; gigatrain's rotary embeddings are "
                          f"the plain ones (rope_type default) or Llama 3.1's scaling (rope_type llama3)")
    try:
        options = {"rope_theta": float(config.get("rope_theta") or scaling.get("rope_theta") or 10000.0)}
        if rope_type == "llama3":
            options.update(
                rope_scaling_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                # transformers' own fallback when the scaling does not name it
                rope_original_max_seq_len=int(scaling.get("original_max_position_embeddings")
                                              or config.get("max_position_embeddings", 2048)))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{source}: incomplete rotary parameters {scaling!r} ({type(err).__name__}: {err})") from None
    return options
