"""Peak FLOP/s of the training device, the denominator of MFU.

GPUs: the dense bf16 peak of the hardware catalog the planner uses (one table for
both). CPUs have no published peak worth trusting (it depends on the cores
we are given, their clocks and the BLAS); we measure one with a large fp32
matmul, once per machine and thread count, and cache it.
"""

from __future__ import annotations

import json
import platform
import time
import warnings

import torch

from gigatrain.paths import cache_dir, write_atomic


def _cpu_key() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def measure_cpu_peak_flops(size: int = 1024, trials: int = 12) -> float:
    """The best of several single fp32 matmuls: the best, not the mean, because a peak is
    what the cores reach when nothing else runs, and shared machines are noisy."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up: thread pool and BLAS start-up
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_peak_flops() -> float:
    path = cache_dir() / "cpu_peak.json"
    key = _cpu_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cached = {}
    if key not in cached:
        cached[key] = measure_cpu_peak_flops()
        write_atomic(path, json.dumps(cached, indent=1))
    return cached[key]


def gpu_peak_flops(device_name: str) -> float:
    from gigatrain.plan.catalog import CatalogError, peak_bf16_flops_for_device

    try:
        return peak_bf16_flops_for_device(device_name)
    except CatalogError as err:
        # Training goes on without an MFU figure (NaN, written as null) rather than stopping.
        warnings.warn(f"{err}; MFU will not be reported")
        return float("nan")


def peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return cpu_peak_flops()
