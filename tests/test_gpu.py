"""CUDA paths: bf16 autocast, fused AdamW, torch.compile. Skipped cleanly without a GPU;
run on a GPU machine with `python -m pytest tests/test_gpu.py`."""

import math

import pytest
import torch

from helpers import TINY
from gigatrain.rundir import RunDir, resolve_run_config
from gigatrain.train.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("compile", [False, True])
def test_trains_in_bf16_on_gpu(tmp_path, byte_data, compile):
    run_dir = tmp_path / "run"
    cfg = resolve_run_config(None, [*TINY, f"--data.path={byte_data}", f"--run.dir={run_dir}", "--train.max_steps=20",
                                    "--train.device=cuda", f"--train.compile={str(compile).lower()}"])
    result = train(cfg)
    steps = [r for r in RunDir(run_dir).metrics_records() if "loss" in r]
    assert result.step == 20 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert 0 < steps[-1]["mfu"] < 1 and steps[-1]["peak_memory_gb"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_and_tensor_parallel_over_nccl(tmp_path, byte_data):
    """torchrun over two GPUs: NCCL, FSDP x TP with bf16 FSDP gathers, compiled blocks."""
    import subprocess
    import sys

    from helpers import REPO

    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "gigatrain",
         "train", *TINY, f"--data.path={byte_data}", f"--run.dir={run_dir}", "--train.max_steps=20",
         "--train.device=cuda", "--train.compile=true", "--model.tie_embeddings=false", "--parallel.tp=2"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    steps = [r for r in RunDir(run_dir).metrics_records() if "loss" in r]
    assert len(steps) == 20 and steps[-1]["loss"] < steps[0]["loss"]
