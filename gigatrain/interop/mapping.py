"""gigatrain's Transformer <-> transformers' LlamaForCausalLM, Qwen3ForCausalLM,
MixtralForCausalLM and Qwen3MoeForCausalLM: parameter names, the rotary permutation, the
experts' layout and config.json. Pure functions on names, tensors and dicts; reading and
writing files is export.py's and importer.py's.

One table drives the four families (`Family`): they share Llama's attention, norms and
embeddings, and differ in QK-norm (Qwen3), in the feed-forward of a MoE layer (its submodule's
name, its experts' names) and in config.json.

The rotary permutation: gigatrain rotates consecutive pairs of each head's query and key
features, (x0, x1), (x2, x3), ... (the Meta / torchtitan convention); transformers rotates
the two halves, (x0, x_{d/2}), (x1, x_{d/2+1}), ... Pair i turns by the same angle in both, so the
same model in the other convention is the same weights with each head's rows of wq and wk
reordered: gigatrain's rows [0e, 0o, 1e, 1o, ...] become [0e, 1e, ..., 0o, 1o, ...]. Values and
every other matrix are untouched, so the permutation is exact in any dtype. QK-norm's gains
[head_dim] scale each head's features before the rotation, feature by feature: they are
reordered as one head's rows are (the norm's mean square does not depend on the order).

The experts: gigatrain stacks each projection of a layer's routed experts in one tensor
[experts, ...] (models/moe.py); the published Mixtral and Qwen3-MoE checkpoints, and what
transformers' save_pretrained writes, hold one tensor per expert and projection
(`block_sparse_moe.experts.3.w1.weight`, `mlp.experts.3.gate_proj.weight`): export splits a
stacked tensor into its experts, import stacks them back. Import also reads transformers 5's
in-memory layout (`mlp.experts.gate_up_proj` [experts, 2 * hidden, d], `mlp.experts.down_proj`),
in case a folder was written from a state dict directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from gigatrain.config import ConfigError
from gigatrain.models.transformer import ModelArgs


@dataclass(frozen=True)
class Family:
    """A transformers architecture gigatrain maps to and from."""

    architecture: str
    model_type: str
    moe_block: str | None = None  # the feed-forward submodule of a MoE layer; None: dense only
    expert_names: tuple[str, str, str] = ("", "", "")  # one expert's gate, down, up projections (w1, w2, w3)
    qk_norm: bool = False  # RMSNorm of each head's queries and keys (ModelArgs.qk_norm), always on


LLAMA = Family("LlamaForCausalLM", "llama")
QWEN3 = Family("Qwen3ForCausalLM", "qwen3", qk_norm=True)
MIXTRAL = Family("MixtralForCausalLM", "mixtral", "block_sparse_moe", ("w1", "w2", "w3"))
QWEN3_MOE = Family("Qwen3MoeForCausalLM", "qwen3_moe", "mlp", ("gate_proj", "down_proj", "up_proj"), qk_norm=True)
FAMILIES = (LLAMA, QWEN3, MIXTRAL, QWEN3_MOE)

# gigatrain name -> transformers name within a layer, every family; {i} is the layer index.
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",  # Qwen3
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    # a dense layer's MLP (Llama's, and Qwen3-MoE's dense layers)
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ROUTER = "feed_forward.router.gate.weight"
_EXPERT_BIAS = "feed_forward.router.expert_bias"
_STACKED = ("feed_forward.experts.w1", "feed_forward.experts.w2", "feed_forward.experts.w3")
_OURS = re.compile(r"layers\.(\d+)\.(.+)")
_THEIRS = re.compile(r"model\.layers\.(\d+)\.(.+)")
_PER_EXPERT = re.compile(r"(\w+)\.experts\.(\d+)\.(\w+)\.weight")
_FUSED = {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}  # transformers 5 in memory
_LAYER_NAMES_BACK = {hf: ours for ours, hf in _LAYER_NAMES.items()}
_GLOBAL_NAMES_BACK = {hf: ours for ours, hf in _GLOBAL_NAMES.items()}


def family_for(args: ModelArgs) -> Family:
    """The architecture a model of `args` exports as (QK-norm: Qwen3, else Llama; with experts,
    Qwen3-MoE or Mixtral); ConfigError, one line naming the option and the value that would
    export, for what that architecture does not compute."""
    if args.is_moe:
        family = QWEN3_MOE if args.qk_norm else MIXTRAL
    else:
        family = QWEN3 if args.qk_norm else LLAMA
    name = family.architecture
    refusals = []
    if args.attn_softcap:
        refusals.append(f"model.attn_softcap={args.attn_softcap}: {name} does not cap attention logits "
                        f"(train with --model.attn_softcap=0)")
    if args.logit_softcap:
        refusals.append(f"model.logit_softcap={args.logit_softcap}: {name} does not cap its output logits "
                        f"(train with --model.logit_softcap=0)")
    if args.mlp_activation != "silu":
        refusals.append(f"model.mlp_activation={args.mlp_activation}: {name}'s MLPs are SwiGLU "
                        f"(train with --model.mlp_activation=silu)")
    if args.is_moe:
        if args.router_score != "softmax":
            refusals.append(f"model.router_score={args.router_score}: {name} scores experts with a softmax "
                            f"(train with --model.router_score=softmax)")
        if args.n_shared_experts:
            refusals.append(f"model.n_shared_experts={args.n_shared_experts}: {name} has no shared experts "
                            f"(train with --model.n_shared_experts=0)")
    if family is MIXTRAL and not args.route_norm:
        refusals.append(f"model.route_norm=false: {name} always renormalises the chosen experts' weights "
                        f"(train with --model.route_norm=true)")
    if family is MIXTRAL and (args.n_dense_layers or args.moe_every != 1):
        refusals.append(f"model.n_dense_layers={args.n_dense_layers} and model.moe_every={args.moe_every}: every "
                        f"{name} layer is MoE (train with --model.n_dense_layers=0 --model.moe_every=1)")
    if refusals:
        raise ConfigError(refusals[0])
    return family


def check_expert_bias(name: str, bias: torch.Tensor) -> None:
    """The aux-loss-free balancing bias moves which experts a token chooses; the exported
    architectures choose by the scores alone, so only a zero bias exports faithfully."""
    if bias.any():
        raise ConfigError(f"{name} is non-zero (max |bias| {bias.abs().max().item():.3g}): the run balanced its experts "
                          f"with the aux-loss-free bias, which no transformers architecture applies; train with "
                          f"--model.bias_update_rate=0 (and --model.aux_loss_coef for balancing) to export it")


def _heads_of(name: str, args: ModelArgs) -> int | None:
    """How many heads a rotated projection's rows hold (None: not rotated)."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    if name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
        return 1  # one head's gains
    return None


def hf_shapes(name: str, shape: torch.Size, args: ModelArgs, family: Family) -> list[tuple[str, list[int]]]:
    """The tensors transformers stores for the gigatrain tensor `name` of `shape`, with their
    shapes, in the order to_hf yields them (none for the expert bias, which export checks is zero)."""
    if name in _GLOBAL_NAMES:
        return [(_GLOBAL_NAMES[name], list(shape))]
    match = _OURS.fullmatch(name)
    if match is None:
        raise KeyError(f"no {family.architecture} name for gigatrain tensor {name!r}")
    layer, local = match.groups()
    prefix = f"model.layers.{layer}."
    if local == _EXPERT_BIAS:
        return []
    if local in _STACKED and family.moe_block:
        projection = family.expert_names[_STACKED.index(local)]
        return [(f"{prefix}{family.moe_block}.experts.{expert}.{projection}.weight", list(shape[1:]))
                for expert in range(shape[0])]
    if local == _ROUTER and family.moe_block:
        return [(f"{prefix}{family.moe_block}.gate.weight", list(shape))]
    if local in _LAYER_NAMES:
        return [(prefix + _LAYER_NAMES[local], list(shape))]
    raise KeyError(f"no {family.architecture} name for gigatrain tensor {name!r}")


def to_hf(name: str, tensor: torch.Tensor, args: ModelArgs, family: Family) -> list[tuple[str, torch.Tensor]]:
    """One gigatrain tensor as the tensors transformers stores (a stacked expert tensor: one per
    expert, views of it)."""
    heads = _heads_of(name, args)
    if heads is not None:  # each head's rows: consecutive pairs -> halves
        tensor = tensor.reshape(heads, args.head_dim // 2, 2, -1).transpose(1, 2).reshape(tensor.shape)
    names = hf_shapes(name, tensor.shape, args, family)
    if len(names) == 1 and list(tensor.shape) == names[0][1]:
        return [(names[0][0], tensor)]
    return [(hf, tensor[expert]) for expert, (hf, _) in enumerate(names)]


def from_hf(name: str, tensor: torch.Tensor, args: ModelArgs, family: Family) -> list[tuple[str, int | None, torch.Tensor]]:
    """One transformers tensor as gigatrain stores it: (gigatrain name, expert, tensor) for each
    part, expert None for a whole tensor, else the slot of a stacked one. Empty for what
    gigatrain computes instead of storing (rotary inverse frequencies of older checkpoints);
    KeyError for a name of no part of the family."""
    if name.endswith("rotary_emb.inv_freq"):
        return []
    if name in _GLOBAL_NAMES_BACK:
        return [(_GLOBAL_NAMES_BACK[name], None, tensor)]
    match = _THEIRS.fullmatch(name)
    if match is None:
        raise KeyError(name)
    layer, local = match.groups()
    prefix = f"layers.{layer}."
    if local in _LAYER_NAMES_BACK:
        ours = prefix + _LAYER_NAMES_BACK[local]
        heads = _heads_of(ours, args)
        if heads is not None:  # halves -> consecutive pairs
            tensor = tensor.reshape(heads, 2, args.head_dim // 2, -1).transpose(1, 2).reshape(tensor.shape)
        return [(ours, None, tensor)]
    if family.moe_block is None:
        raise KeyError(name)
    # transformers 5 names every MoE block `mlp` in memory (Mixtral's files: `block_sparse_moe`)
    blocks = (family.moe_block, "mlp")
    if local in (f"{block}.gate.weight" for block in blocks):
        return [(prefix + _ROUTER, None, tensor)]
    per_expert = _PER_EXPERT.fullmatch(local)
    if per_expert and per_expert.group(1) in blocks and per_expert.group(3) in family.expert_names:
        stacked = _STACKED[family.expert_names.index(per_expert.group(3))]
        return [(prefix + stacked, int(per_expert.group(2)), tensor)]
    if local == "mlp.experts.gate_up_proj":  # [experts, gate rows then up rows, d_model]
        gate, up = tensor.chunk(2, dim=1)
        return [(prefix + _STACKED[0], None, gate), (prefix + _STACKED[2], None, up)]
    if local == "mlp.experts.down_proj":
        return [(prefix + _STACKED[1], None, tensor)]
    raise KeyError(name)


def hf_config(args: ModelArgs, family: Family, *, bos_token_id: int | None, eos_token_id: int | None,
              dtype: torch.dtype) -> dict:
    """config.json of `family` for a model of this shape."""
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
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
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if family is LLAMA:
        return {**config, "mlp_bias": False}
    if family is QWEN3:
        return {**config, "use_sliding_window": False, "sliding_window": None}
    moe = {"num_experts_per_tok": args.top_k, "router_aux_loss_coef": args.aux_loss_coef,
           "output_router_logits": False, "sliding_window": None}
    if family is MIXTRAL:  # every layer MoE: its experts' hidden size is the only one
        return {**config, **moe, "intermediate_size": args.moe_hidden, "num_local_experts": args.n_experts,
                "router_jitter_noise": 0.0}
    return {**config, **moe, "moe_intermediate_size": args.moe_hidden, "num_experts": args.n_experts,
            "norm_topk_prob": args.route_norm, "use_sliding_window": False, "decoder_sparse_step": 1,
            "mlp_only_layers": [layer for layer in range(args.n_layers) if not args.is_moe_layer(layer)]}


def model_args_from_hf(config: dict, source: str) -> tuple[ModelArgs, Family]:
    """The ModelArgs of a transformers config.json and the family it maps with; one clear line for
    what gigatrain cannot represent (`source` names the file in the message)."""
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    family = next((f for f in FAMILIES if architectures[0] == f.architecture), None) or \
        next((f for f in FAMILIES if config.get("model_type") == f.model_type), None)
    if family is None:
        raise ConfigError(f"{source}: architecture {architectures[0]} is not supported; gigatrain imports "
                          f"{', '.join(f.architecture for f in FAMILIES)}")
    unsupported = {key: config[key] for key in ("attention_bias", "mlp_bias") if config.get(key)}
    if config.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = config["hidden_act"]
    if config.get("sliding_window") is not None and (family is MIXTRAL or config.get("use_sliding_window")):
        unsupported["sliding_window"] = config["sliding_window"]
    if unsupported:
        raise ConfigError(f"{source}: {', '.join(f'{k}={v}' for k, v in unsupported.items())} is not supported; "
                          f"gigatrain's attention is full causal attention without biases and its MLPs are "
                          f"SwiGLU (silu) without biases")
    rope = _rope_options(config, source)
    try:
        n_heads = int(config["num_attention_heads"])
        shape = dict(
            n_layers=int(config["num_hidden_layers"]),
            d_model=int(config["hidden_size"]),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            ffn_hidden=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
            norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            **rope,
        )
        if family.moe_block:
            shape.update(_moe_options(config, family, shape["n_layers"], source))
        head_dim = int(config.get("head_dim") or shape["d_model"] // n_heads)
        args = ModelArgs(**shape, qk_norm=family.qk_norm,
                         head_dim_override=0 if head_dim * n_heads == shape["d_model"] else head_dim)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise ConfigError(f"{source}: not a complete {family.architecture} config ({type(err).__name__}: {err})") from None
    return args, family


def _moe_options(config: dict, family: Family, n_layers: int, source: str) -> dict:
    """The ModelArgs expert fields of a Mixtral or Qwen3-MoE config.json."""
    n_experts = int(config.get("num_local_experts") or config["num_experts"])
    options = dict(n_experts=n_experts, top_k=int(config["num_experts_per_tok"]), router_score="softmax",
                   aux_loss_coef=float(config.get("router_aux_loss_coef") or 0.0))
    if family is MIXTRAL:
        # Mixtral always renormalises the chosen weights; every layer is MoE, of intermediate_size.
        return {**options, "route_norm": True, "expert_hidden": int(config["intermediate_size"])}
    step = int(config.get("decoder_sparse_step") or 1)
    dense_only = set(config.get("mlp_only_layers") or [])
    moe_layers = [layer for layer in range(n_layers) if layer not in dense_only and (layer + 1) % step == 0]
    pattern = _layer_pattern(moe_layers, n_layers)
    if pattern is None:
        raise ConfigError(f"{source}: MoE layers {moe_layers} (decoder_sparse_step={step}, mlp_only_layers="
                          f"{sorted(dense_only)}) are not the first dense layers then every k-th that gigatrain "
                          f"builds (model.n_dense_layers, model.moe_every)")
    return {**options, "route_norm": bool(config.get("norm_topk_prob", False)),
            "expert_hidden": int(config["moe_intermediate_size"]),
            "n_dense_layers": pattern[0], "moe_every": pattern[1]}


def _layer_pattern(moe_layers: list[int], n_layers: int) -> tuple[int, int] | None:
    """(n_dense_layers, moe_every) that make exactly these layers MoE, or None."""
    if not moe_layers:
        return None
    first = moe_layers[0]
    for every in range(1, n_layers + 1):
        if moe_layers == list(range(first, n_layers, every)):
            return first, every
    return None


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
