"""Each fault of GIGATRAIN_FAULT injected into a real two-process gloo run under torchrun, and
what must hold afterwards: nothing lost beyond the last checkpoint, bit-exact where a fault
costs no update (kills, hangs, failed checkpoint writes), events in events.jsonl,
clear messages and exit codes. (Pre-emption, SIGUSR1 and the requeue: tests/fault/test_spare.py.)

The reference is one uninterrupted two-process run of the same configuration (conftest.py)."""

import json

import pytest
import torch

from gigatrain.fault import EXIT_DIVERGED, EXIT_HANG
from gigatrain.metrics.goodput import summarize
from gigatrain.rundir import RunDir
from gigatrain.train.recovery import PHASES
from fault_runs import STEPS, assert_same_run, events, train_2proc
from helpers import final_weights, run_cli

PLANNER_TOLERANCE = 0.05  # the planner's goodput for a measured run against its measured goodput

def test_killed_rank_restarts_from_the_last_checkpoint_bit_exact(tmp_path, byte_data, reference):
    run_dir = tmp_path / "run"
    result = train_2proc(byte_data, run_dir, fault="kill:step=7:rank=1", restarts=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exitcode: -9" in result.stderr  # torchrun saw rank 1 die of SIGKILL...
    assert result.stdout.count("injecting fault kill:step=7:rank=1") == 1  # ...once: the restart did not re-fire it
    assert "resumed at step 5" in result.stdout
    assert_same_run(run_dir, reference)
    restart, = events(run_dir, "restart")
    assert restart["after"] == "failure" and restart["step"] == 5
    assert restart["recomputed_steps"] == 1  # step 6 was logged before the kill at step 7, and done again
    assert restart["restart_s"] > 0 and restart["loaded_from"] == "storage"
    assert restart["warm_spare"] is True  # forked from the job's spare (tests/fault/test_spare.py)
    # Where the restart went, phase by phase, from the last sign of life to the first step's end.
    assert list(restart["phases"]) == list(PHASES) and min(restart["phases"].values()) >= 0
    assert sum(restart["phases"].values()) == pytest.approx(restart["restart_s"])
    assert restart["phases"]["imports_s"] > 0 and restart["phases"]["load_s"] > 0
    startup, = events(run_dir, "startup")  # the job's first start: no failure to detect, nothing loaded
    assert startup["loaded_from"] is None and startup["warm_spare"] is False and set(startup["phases"]) == set(PHASES) - {"detect_s", "start_s"}
    assert sum(startup["phases"].values()) == pytest.approx(startup["startup_s"])

    report = run_cli("report", str(run_dir), check=True).stdout
    assert "goodput" in report and "restarts" in report
    assert "where start-up time goes" in report and "loaded their state from: storage (1)" in report

    summary = summarize(RunDir(run_dir))
    assert summary["restarts"] == 1 and summary["failures"] == 1 and summary["recomputed_steps"] == 1
    assert 0 < summary["goodput"] < 1
    # The planner's closed form (storage mode), fed this run's own failure rate, restart time,
    # checkpoint interval and stall and the time it leaves out, predicts the measured goodput
    # within 5% (what it cannot know: where in the interval the kill fell, one step here).
    assert summary["planner_goodput"] == pytest.approx(summary["goodput"], rel=PLANNER_TOLERANCE)


def test_failed_and_killed_checkpoint_writes_leave_the_previous_one(tmp_path, byte_data, reference):
    """The disk fills up while rank 1 writes the step-6 checkpoint (training goes on), then
    rank 0 dies while the step-9 one is being committed: the restart loads step 3."""
    run_dir = tmp_path / "run"
    result = train_2proc(byte_data, run_dir, "--train.checkpoint_every=3",
                         fault="ckpt_fail:step=6:rank=1;kill:step=9:at=save", restarts=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint at step 6 was not written (rank 1: no space left on " in result.stderr
    assert "removing .tmp-step_00000009: a checkpoint whose writer stopped before committing it" in result.stderr
    assert "resumed at step 3" in result.stdout
    failed, = events(run_dir, "checkpoint_failed")
    assert failed["step"] == 6 and "rank 1: no space left on " in failed["error"] and "unexpected pos" not in failed["error"]
    assert events(run_dir, "restart")[0]["step"] == 3
    assert not list(RunDir(run_dir).checkpoints.glob(".tmp-*"))
    assert_same_run(run_dir, reference)
    manifest = json.loads((RunDir(run_dir).checkpoints / "step_00000010" / "manifest.json").read_text())
    assert {".metadata", "trainer_state.json"} <= set(manifest["files"])


def test_hang_is_caught_by_the_watchdog_and_the_job_restarts(tmp_path, byte_data, reference):
    run_dir = tmp_path / "run"
    result = train_2proc(byte_data, run_dir, "--fault.watchdog_s=3", fault="hang:step=7:rank=0", restarts=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exitcode: {EXIT_HANG}" in result.stderr
    assert "watchdog: rank 0 made no progress for 3 s" in result.stderr
    stacks = {p.name.split("-")[0]: p.read_text() for p in RunDir(run_dir).stacks.iterdir()}
    assert set(stacks) == {"rank0", "rank1"}  # rank 1 waited in a collective for rank 0
    assert "in before_step" in stacks["rank0"]  # the hung rank's main thread, where it hangs
    for text in stacks.values():  # every thread: the main one, the watchdog's, the checkpoint writer's
        assert text.count("Thread 0x") + text.count("Current thread 0x") >= 2
    assert "in forward_backward" in stacks["rank1"] or "in clip_grad_norm" in stacks["rank1"] or "in reduce_sum" in stacks["rank1"]
    assert_same_run(run_dir, reference)


def test_nan_updates_are_skipped_then_rolled_back(tmp_path, byte_data):
    """A NaN at step 3 skips one update; three in a row from step 7 roll back to step 5 and go
    on past the data that caused them."""
    run_dir = tmp_path / "run"
    result = train_2proc(byte_data, run_dir, fault="nan:step=3;nan:step=7:count=3")
    assert result.returncode == 0, result.stderr[-3000:]
    skips = events(run_dir, "skip")
    assert [(e["step"], e["reason"]) for e in skips] == [(3, "nan"), (7, "nan"), (8, "nan"), (9, "nan")]
    rollback, = events(run_dir, "rollback")
    assert (rollback["from_step"], rollback["step"], rollback["recomputed_steps"]) == (9, 5, 4)
    assert "rolled back from step 9 to the checkpoint at step 5" in result.stdout
    records = [r for r in RunDir(run_dir).metrics_records() if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step once, after the rollback too
    assert [r["step"] for r in records if r.get("skipped")] == [3]
    assert all(torch.isfinite(w).all() for w in final_weights(run_dir).values())
    # After the rollback the loader went on past the poisoned windows: steps 6-9 saw new data.
    loader = json.loads((RunDir(run_dir).checkpoints / "step_00000010" / "trainer_state.json").read_text())["loader"]
    assert loader["batch_in_epoch"] == STEPS + 4


def test_persistent_nan_stops_with_a_clear_message(tmp_path, byte_data):
    run_dir = tmp_path / "run"
    result = train_2proc(byte_data, run_dir, "--train.checkpoint_every=2", "--fault.rollback_after=2",
                         "--fault.max_rollbacks=1", fault="nan:step=3:count=1000")
    assert result.returncode != 0
    assert f"exitcode: {EXIT_DIVERGED}" in result.stderr
    assert "training keeps failing numerically: 2 skipped updates in a row" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert len(events(run_dir, "rollback")) == 1 and len(events(run_dir, "diverged")) == 1
    assert (RunDir(run_dir).checkpoints / "step_00000002").is_dir()  # the last good checkpoint is kept


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "out_of_vocabulary", "manifest_mismatch"])
def test_bad_data_stops_every_rank_naming_the_file(tmp_path, byte_data, damage):
    import hashlib
    import shutil

    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(byte_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    shard = data / entry["file"]
    if damage == "corrupted":
        raw = bytearray(shard.read_bytes())
        raw[11] ^= 0x01
        shard.write_bytes(bytes(raw))
        expected = f"shard {shard} is corrupted"
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-2])
        expected = f"shard {shard} has"
    elif damage == "out_of_vocabulary":
        tokens = np.fromfile(shard, dtype=manifest["dtype"])
        tokens[5] = 300
        tokens.tofile(shard)
        entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
        (data / "manifest.json").write_text(json.dumps(manifest))
        expected = f"shard {shard} holds token id 300, outside the vocabulary of 256"
    else:
        manifest["splits"]["train"]["tokens"] += 1
        (data / "manifest.json").write_text(json.dumps(manifest))
        expected = f"{data / 'manifest.json'}: split 'train' says"
    result = train_2proc(data, tmp_path / "run")
    assert result.returncode != 0
    assert "exitcode: 2" in result.stderr
    printed = [line for line in result.stderr.splitlines() if line.startswith("gigatrain: error:")]
    assert len(printed) == 1 and expected in printed[0]  # rank 0 says so for every rank, naming the file
    assert f"traceback : gigatrain: error: {expected}" in result.stderr  # and torchrun's summary names it
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
