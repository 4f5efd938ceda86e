"""Pipeline parallelism with `torch.distributed.pipelining`.

A stage is a copy of the model with the layers it does not own deleted (and the
embeddings or the head set to None), so parameter names stay those of the whole model
and checkpoints load under any layout. Ranks hold one stage (GPipe, 1F1B) or several
(the looped schedules: interleaved 1F1B, looped BFS, interleaved zero-bubble), which give
rank r stages r, r+pp, r+2*pp, ...
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _PipelineSchedule, get_schedule_class

from gigatrain.parallel.mesh import ParallelDims


def stage_indices(dims: ParallelDims, pp_rank: int) -> list[int]:
    return [pp_rank + k * dims.pp for k in range(dims.stages_per_rank)]


def stage_module(model: nn.Module, stage: int, num_stages: int, keep_original: bool) -> nn.Module:
    """The part of `model` that pipeline stage `stage` of `num_stages` runs."""
    part = model if keep_original else copy.deepcopy(model)
    per_stage = len(part.layers) // num_stages
    owned = {str(i) for i in range(stage * per_stage, (stage + 1) * per_stage)}
    for name in [n for n in part.layers if n not in owned]:
        del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
    if stage != num_stages - 1:
        part.norm = None
        part.output = None
    return part


def split_model(model: nn.Module, dims: ParallelDims, pp_rank: int) -> tuple[list[int], list[nn.Module]]:
    indices = stage_indices(dims, pp_rank)
    parts = [stage_module(model, s, dims.num_stages, keep_original=k == len(indices) - 1) for k, s in enumerate(indices)]
    return indices, parts


def build_schedule(parts: list[nn.Module], indices: list[int], dims: ParallelDims, pp_mesh: DeviceMesh,
                   device: torch.device, loss_fn: Callable, microbatches: int) -> _PipelineSchedule:
    stages = [PipelineStage(part, index, dims.num_stages, device, group=pp_mesh.get_group())
              for part, index in zip(parts, indices)]
    schedule_class = get_schedule_class(dims.pp_schedule)
    # scale_grads divides by the number of microbatches: the gradient of the mean loss.
    if len(stages) == 1:
        return schedule_class(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)
    return schedule_class(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)
