"""float8 training of the linear layers (`train.float8`), with torchao, applied from outside
the model like every other transformation in `parallelize`.

Each selected `nn.Linear` becomes torchao's `Float8Linear`: its matmuls (forward, and both of
the backward's) run on Hopper's float8 tensor cores, with scales computed on the fly per
tensor ("tensorwise": one scale per tensor, cuBLAS's fast kernel) or per row ("rowwise": more
accurate, CUTLASS's kernel). The weights, the optimizer state and checkpoints stay as they
are (fp32 parameters, same names): only the matmuls change precision. As in torchtitan, the
conversion comes before activation checkpointing, compile and FSDP, so that compile fuses the
casts into the neighbouring kernels and FSDP shards the converted modules. torchao is an
optional dependency (the `gpu` extra), imported only when float8 is asked for.
"""

from __future__ import annotations

import importlib.util

import dataclasses

import torch
from torch import nn

from gigatrain.config import ConfigError, TrainConfig

# float8 matmuls need both dimensions of the weight to be multiples of 16 (cuBLAS's and
# CUTLASS's layout rule for 8-bit operands).
FLOAT8_MULTIPLE = 16
# The head stays in bf16: it feeds the loss directly, where float8's rounding of the logits
# costs accuracy (torchtitan and torchao's recipes leave it out too), and a tied head shares
# its weight with the embeddings, which are no linear layer.
HEAD_NAME = "output"
# A mixture-of-experts router stays in bf16 too: its scores pick each token's experts, and
# float8's rounding would flip close choices (torchtitan leaves it out as well).
ROUTER_NAME = "router"
# Compute capability of the first GPUs with float8 tensor cores (Ada; Hopper is 9.0).
FLOAT8_CAPABILITY = (8, 9)


def converts_to_float8(module: nn.Module, name: str) -> bool:
    """Whether the linear layer `module`, at `name` in the model, trains in float8: not the
    output head, not a router's, and both its dimensions multiples of 16."""
    parts = name.split(".")
    if not isinstance(module, nn.Linear) or parts[-1] == HEAD_NAME or ROUTER_NAME in parts:
        return False
    return module.in_features % FLOAT8_MULTIPLE == 0 and module.out_features % FLOAT8_MULTIPLE == 0


def float8_linear_names(model: nn.Module) -> list[str]:
    """The names of the linear layers `apply_float8` converts."""
    return [name for name, module in model.named_modules() if converts_to_float8(module, name)]


def check_float8(cfg: TrainConfig, device: torch.device, tp: int) -> None:
    """Refuse train.float8 where it cannot run, before anything starts."""
    if not cfg.float8:
        return
    if device.type != "cuda":
        raise ConfigError(f"train.float8=true needs a CUDA GPU with float8 tensor cores (H100, H200, L40S); this run's "
                          f"device is {device.type}: drop --train.float8=true or train on such a GPU")
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_CAPABILITY:
        raise ConfigError(f"train.float8=true needs a GPU of compute capability 8.9 or more (Ada, Hopper); "
                          f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: drop --train.float8=true")
    if tp > 1:
        raise ConfigError(f"train.float8=true is not supported with parallel.tp={tp} (float8 tensor parallelism needs "
                          f"torchao's own plans); use parallel.tp=1 or drop --train.float8=true")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("train.float8=true needs torchao, which is not installed: pip install 'gigatrain[gpu]' "
                          "(torchao==0.18.0), or drop --train.float8=true")


def apply_float8(model: nn.Module, cfg: TrainConfig, fsdp_shards: int) -> None:
    """Convert the model's selected linear layers to float8 training, in place. With FSDP over
    several ranks and tensorwise scaling, the weights are also all-gathered in float8: half
    the bytes of a bf16 gather (rowwise scales cannot be computed shard by shard)."""
    if not cfg.float8:
        return
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(cfg.float8_recipe)
    if cfg.float8_recipe == "tensorwise" and fsdp_shards > 1:
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    convert_to_float8_training(model, config=config, module_filter_fn=converts_to_float8)
