"""QK-norm under tensor parallelism: the heads are split over the ranks, the per-head norm gains
are replicated, and the sharded model computes what one process does (forward and gradients).
Run in the parallel tests' one torchrun job (tests/parallel/conftest.py, layout_checks.py), on
two tp=2 groups side by side."""

import json


def layouts_plan() -> tuple[dict, list[dict]]:
    return {}, [{"name": "qk_norm", "check": "qk_norm_tp"}]


def test_qk_norm_under_tensor_parallel_equals_one_process(layouts_job):
    for rank in range(4):
        report = json.loads((layouts_job.folders[__name__] / "qk_norm" / f"qk_norm_tp_rank{rank}.json").read_text())
        assert report["logits"] < 1e-5, rank
        assert report["norm_placements"] == [True] * 4  # 2 layers x (q_norm, k_norm): replicated DTensors
        assert any("q_norm" in name for name in report["grads"])
        for name, error in report["grads"].items():
            assert error < 1e-5, (rank, name, error)
