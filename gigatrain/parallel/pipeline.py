"""Pipeline parallelism with `torch.distributed.pipelining`.

A stage is a copy of the model with the layers it does not own deleted (and the
embeddings or the head set to None), so parameter names stay those of the whole model
and checkpoints load under any layout. Ranks hold one stage (GPipe, 1F1B) or several
(the looped schedules: interleaved 1F1B, looped BFS, interleaved zero-bubble), which give
rank r stages r, r+pp, r+2*pp, ...

Tied embeddings (Megatron's way): the first stage embeds with the weight and the last
stage's head projects with it, so each holds a copy, and the last stage keeps it under
the embeddings' name, as one process does (its embedding module is never called: it is
handed hidden states). Both copies start from the same draw, and after every backward
the two gradients are summed over the pair of ranks holding them, so both take the same
update and stay equal.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
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
    last = stage == num_stages - 1
    if stage != 0 and not (last and part.args.tie_embeddings):
        part.tok_embeddings = None
    if not last:
        part.norm = None
        part.output = None
    return part


def split_model(model: nn.Module, dims: ParallelDims, pp_rank: int) -> tuple[list[int], list[nn.Module]]:
    indices = stage_indices(dims, pp_rank)
    parts = [stage_module(model, s, dims.num_stages, keep_original=k == len(indices) - 1) for k, s in enumerate(indices)]
    return indices, parts


def tied_weight_group(dims: ParallelDims) -> dist.ProcessGroup | None:
    """The group of the two ranks that hold the tied embedding weight for this rank's place
    off the pipeline axis: the first stage's and the last stage's (None on other ranks).
    Every rank must call it: creating groups is collective."""
    # Ranks are numbered with pp outermost (ParallelDims.build_meshes), and stage s runs on
    # pipeline rank s % pp (stage_indices).
    ranks_per_stage = dims.world_size // dims.pp
    last = (dims.num_stages - 1) % dims.pp
    pairs = [[i, last * ranks_per_stage + i] for i in range(ranks_per_stage)]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    return group


def build_schedule(parts: list[nn.Module], indices: list[int], dims: ParallelDims, pp_mesh: DeviceMesh,
                   device: torch.device, loss_fn: Callable, microbatches: int) -> _PipelineSchedule:
    stages = [PipelineStage(part, index, dims.num_stages, device, group=pp_mesh.get_group())
              for part, index in zip(parts, indices)]
    schedule_class = get_schedule_class(dims.pp_schedule)
    # scale_grads divides by the number of microbatches: the gradient of the mean loss.
    if len(stages) == 1:
        return schedule_class(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)
    return schedule_class(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)
