"""Which process of the job this is: its rank and the job's size, from the process group once
there is one, else from torchrun's environment (RANK, WORLD_SIZE), else one process alone.

On the bottom floor, and importing no torch, so that everything may ask before (or without) a
process group: the CLI choosing which worker reports an error, the checkpointer, the mesh, the
trainer. A process group exists only once torch.distributed has been imported, so until then
the environment is the answer.
"""

from __future__ import annotations

import os
import sys


def _process_group():
    """torch.distributed if this process has initialized a process group, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def world_size() -> int:
    """Processes in this job: the process group's size, or torchrun's WORLD_SIZE before it exists."""
    group = _process_group()
    return group.get_world_size() if group else int(os.environ.get("WORLD_SIZE", "1"))


def global_rank() -> int:
    """This process's rank in the job: the process group's, or torchrun's RANK before it exists."""
    group = _process_group()
    return group.get_rank() if group else int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 alone prints, writes run files and metrics, and commits checkpoints."""
    return global_rank() == 0
