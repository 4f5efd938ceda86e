"""bench/gpu.py's every code path on a CPU (--smoke, ~10 s): the trainer runs of each variant,
the loss switch, the profiles, the float8 refusal without a GPU, results.json and summary.md."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_variant_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    runs = {r["variant"]: r for r in report["results"]}
    assert list(runs) == ["before", "after", "fp8-tensor", "after-noac", "fp8-row"]
    for name in ("before", "after", "after-noac"):
        assert runs[name]["status"] == "ok" and runs[name]["steps"] == 8 and runs[name]["tokens_per_s"] > 0
        assert "aten::" in runs[name]["profile"]
    # The plain and the chunked loss train the same model to fp32 rounding.
    for plain, chunked in zip(runs["before"]["losses"], runs["after"]["losses"]):
        assert abs(plain - chunked) <= 1e-5 * abs(plain)
    if not torch.cuda.is_available():
        assert runs["fp8-tensor"]["status"].startswith("refused: train.float8=true needs a CUDA GPU")
    summary = (tmp_path / "summary.md").read_text()
    assert "| before | ok | 2 |" in summary and "### after-noac" in summary
