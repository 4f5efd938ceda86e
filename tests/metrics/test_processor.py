"""The step record on hand-computed numbers, and what the processor writes (rank 0) or not."""

import pytest
import torch

from gigatrain.metrics.processor import MetricsProcessor, mfu
from gigatrain.rundir import RunDir

STEP_KEYS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "tokens", "peak_memory_gb", "time"]


def processor(run_dir):
    # 512 tokens a step, 6 MFLOP a token, two processes of 1 TFLOP/s each.
    return MetricsProcessor(run_dir, tokens_per_step=512, flops_per_token=6e6, peak_flops=1e12, world_size=2,
                            device=torch.device("cpu"))


def test_mfu_is_the_jobs_model_flops_over_its_peak():
    assert mfu(1000.0, 6e6, 1e12, 2) == pytest.approx(1000 * 6e6 / 2e12)


def test_step_record_on_hand_computed_numbers():
    record = processor(None).step_record(3, 2.5, 1e-3, 0.7, step_time_s=0.5)
    assert list(record) == STEP_KEYS
    assert record["tokens_per_s"] == 1024.0  # 512 tokens in half a second
    assert record["mfu"] == pytest.approx(1024 * 6e6 / 2e12)
    assert record["tokens"] == 3 * 512
    assert record["peak_memory_gb"] > 0
    assert processor(None).step_record(4, 9.0, 1e-3, 0.7, 0.5, skipped="spike")["skipped"] == "spike"


def test_rank_0_writes_metrics_and_events_the_others_nothing(tmp_path, capsys):
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    written = processor(run_dir)
    written.start(0, "plain", max_steps=2)
    written.event({"event": "start", "step": 0})
    for step in (1, 2):
        written.log_step(step, 2.0, 1e-3, 0.5, 0.25)
    written.log_eval(2, 1.5, 0.75)
    written.log_final_eval(2, 1.4, 0.7, batches=3)
    written.close_metrics(), written.close_events()
    records = run_dir.metrics_records()
    assert [r["step"] for r in records] == [1, 2, 2, 2]
    assert records[2] == {"step": 2, "val_loss": 1.5, "val_bpb": 0.75}
    assert records[3] == {"step": 2, "val_loss": 1.4, "val_bpb": 0.7, "val_batches": 3}
    assert [e["event"] for e in run_dir.event_records()] == ["start"] and "time" in run_dir.event_records()[0]
    assert "step 2: val loss 1.5000, 0.7500 bits/byte" in capsys.readouterr().out

    silent = processor(None)
    silent.start(0, "plain", max_steps=2)
    silent.log_step(1, 2.0, 1e-3, 0.5, 0.25)
    silent.message("not shown")
    assert capsys.readouterr().out == ""


def test_start_drops_the_steps_about_to_be_recomputed(tmp_path):
    run_dir = RunDir(tmp_path)
    first = processor(run_dir)
    first.start(0, "off", max_steps=5)
    for step in range(1, 6):
        first.log_step(step, 2.0, 1e-3, 0.5, 0.25)
    first.close_metrics()
    resumed = processor(run_dir)
    resumed.start(3, "off", max_steps=5)
    resumed.close_metrics()
    assert [r["step"] for r in run_dir.metrics_records()] == [1, 2, 3]
