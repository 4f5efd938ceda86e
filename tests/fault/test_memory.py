"""fault.recovery=memory in real two-process gloo runs under torchrun, each process its own
"host" (fault.ranks_per_host=1) with its own folder under a temporary fault.memory_dir: the
restarts load the in-memory copies (from the process's own host, or from its peer's when its
host lost them) and the finished run equals the uninterrupted reference bit for bit."""

import shutil

from fault_runs import assert_same_run, events, train_2proc
from gigatrain.metrics.goodput import summarize
from gigatrain.rundir import RunDir


def test_kills_and_a_lost_host_restart_from_memory_bit_exact(tmp_path, byte_data, reference):
    """One job: rank 1 dies at step 3 (before any storage checkpoint: the restart loads the
    copies of step 2 from memory), then rank 0 at step 7, which ends the job (its restarts are
    spent) with every process gone. Host 0's memory folder is then lost, as with a replaced
    machine; the next job loads step 6 (newer than the storage checkpoint of step 5), rank 0's
    state from its peer, host 1."""
    run_dir, memory_dir = tmp_path / "run", tmp_path / "shm"
    memory = ["--fault.recovery=memory", "--fault.memory_every=2", "--fault.ranks_per_host=1",
              f"--fault.memory_dir={memory_dir}"]
    faults = "kill:step=3:rank=1;kill:step=7:rank=0"
    first = train_2proc(byte_data, run_dir, *memory, fault=faults, restarts=1)
    assert first.returncode != 0 and first.stderr.count("exitcode: -9") == 2, first.stderr[-3000:]
    assert "resumed at step 2" in first.stdout

    run_folder, = memory_dir.iterdir()
    assert sorted(p.name for p in run_folder.iterdir()) == ["host0", "host1"]
    held = {host: sorted(p.name.split(".")[:2] for p in (run_folder / host).iterdir()) for host in ("host0", "host1")}
    # Each host: its own rank's and its peer's copies of the two newest steps.
    assert held["host1"] == [["step_00000004", "rank00000"], ["step_00000004", "rank00001"],
                             ["step_00000006", "rank00000"], ["step_00000006", "rank00001"]]
    assert held["host0"] == held["host1"]
    shutil.rmtree(run_folder / "host0")

    second = train_2proc(byte_data, run_dir, *memory, fault=faults)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at step 6" in second.stdout
    assert_same_run(run_dir, reference)

    restores = [(e["step"], e["loaded_from"], e["from_peer"]) for e in events(run_dir, "memory_restore")]
    assert restores == [(2, "memory", []), (6, "peer", [0])]
    assert not events(run_dir, "memory_fallback")
    copies = events(run_dir, "memory_checkpoint")
    assert {e["step"] for e in copies} == {2, 4, 6, 8}
    assert all(e["stall_s"] < 5 and e["bytes"] > 0 for e in copies)
    summary = summarize(RunDir(run_dir))
    assert summary["memory_checkpoints"] == len(copies)
    assert summary["checkpoint_stall_s"] >= sum(e["stall_s"] for e in copies)
    assert not run_folder.exists()  # the finished run removed its copies
