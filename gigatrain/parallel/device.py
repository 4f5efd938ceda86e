"""The device and precision of this process, and the autocast that applies the precision."""

from __future__ import annotations

import os

import torch

from gigatrain.config import ConfigError


def pick_device(name: str) -> torch.device:
    """The device of this process: under torchrun, GPU LOCAL_RANK of the node."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available; use train.device=cpu or auto")
    if name == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. bf16 on GPU by default; CPUs train in fp32,
    where bf16 is slower on most cores and the precision is not worth losing."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if name == "bfloat16" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast on GPU; a no-op context in full precision."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
