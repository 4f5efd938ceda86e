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


def test_chunked_loss_on_gpu_matches_the_plain_loss_in_less_memory():
    """llama3's vocabulary over 2048 bf16 tokens: the same loss and gradient as the fp32
    cross-entropy, with a fraction of its extra memory (no fp32 copy of every logit)."""
    import torch.nn.functional as F

    from gigatrain.models.loss import chunked_cross_entropy

    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(2048, 128256, device="cuda", generator=generator)).bfloat16()
    targets = torch.randint(0, 128256, (2048,), device="cuda", generator=generator)
    targets[:100] = -100
    results = {}
    for name, fn in (("plain", lambda x: F.cross_entropy(x.float(), targets)),
                     ("chunked", lambda x: chunked_cross_entropy(x, targets))):
        leaf = logits.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = fn(leaf)
        loss.backward()
        torch.cuda.synchronize()
        results[name] = (loss.item(), leaf.grad, torch.cuda.max_memory_allocated() - before)
        del leaf, loss
    (plain, plain_grad, plain_peak), (chunked, chunked_grad, chunked_peak) = results["plain"], results["chunked"]
    assert math.isclose(chunked, plain, rel_tol=1e-5)
    torch.testing.assert_close(chunked_grad.float(), plain_grad.float(), rtol=1e-2, atol=1e-6)
    assert chunked_peak < 0.6 * plain_peak, (chunked_peak, plain_peak)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_trains_on_gpu(tmp_path, byte_data, recipe):
    """train.float8: every block's linear layer becomes torchao's Float8Linear (the head does
    not), and the model trains."""
    pytest.importorskip("torchao.float8", reason="train.float8 needs torchao (the gpu extra)")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need compute capability 8.9+")
    from gigatrain.train.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = resolve_run_config(None, [*TINY, f"--data.path={byte_data}", f"--run.dir={run_dir}", "--train.max_steps=20",
                                    "--train.device=cuda", "--train.float8=true", f"--train.float8_recipe={recipe}"])
    trainer = Trainer(cfg)
    converted = [name for name, m in trainer.model.named_modules() if type(m).__name__ == "Float8Linear"]
    assert len(converted) == 7 * trainer.model_args.n_layers and "output" not in converted
    try:
        trainer.run()
    finally:
        trainer.close()
    steps = [r for r in RunDir(run_dir).metrics_records() if "loss" in r]
    assert len(steps) == 20 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
