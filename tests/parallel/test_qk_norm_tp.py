"""QK-norm under tensor parallelism: the heads are split over the ranks, the per-head norm gains
are replicated, and the sharded model computes what one process does (forward and gradients)."""

import json
import os
import subprocess

from helpers import REPO, torchrun


def test_qk_norm_under_tensor_parallel_equals_one_process(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    subprocess.run(torchrun("--nproc-per-node=2", str(REPO / "tests/parallel/qk_norm_tp_worker.py"), str(out)),
                   env=env, cwd=REPO, check=True, timeout=300, capture_output=True)
    report = json.loads(out.read_text())
    assert report["logits"] < 1e-5
    assert report["norm_placements"] == [True] * 4  # 2 layers x (q_norm, k_norm): replicated DTensors
    assert any("q_norm" in name for name in report["grads"])
    for name, error in report["grads"].items():
        assert error < 1e-5, (name, error)
