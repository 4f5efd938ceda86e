"""fault.recovery=memory in real two-process gloo runs under torchrun, each process its own
"host" (fault.ranks_per_host=1) with its own folder under a temporary fault.memory_dir: the
restarts load the in-memory copies (from the process's own host, or from its peer's when its
host lost them) and the finished run equals the uninterrupted reference bit for bit."""

import shutil

from fault_runs import assert_same_run, events, train_2proc
from gigatrain.metrics.goodput import summarize
from gigatrain.rundir import RunDir


def test_a_killed_job_and_a_lost_host_restart_from_memory_bit_exact(tmp_path, byte_data, reference):
    """Rank 0 dies at step 7, which ends the job (no restarts left): every process is gone,
    the copies of steps 4 and 6 stay in host memory. Host 0's folder is then lost, as with a
    replaced machine. The next job loads step 6, newer than the storage checkpoint of step 5:
    rank 1 its own host's copy, rank 0 the copy its peer (host 1) kept; and finishes equal to
    the uninterrupted run. (A restart from the own host's copies alone, loaded_from "memory",
    runs in tests/train/test_checkpointing.py; both are the same restart to the processes.)"""
    run_dir, memory_dir = tmp_path / "run", tmp_path / "shm"
    memory = ["--fault.recovery=memory", "--fault.memory_every=2", "--fault.ranks_per_host=1",
              f"--fault.memory_dir={memory_dir}"]
    fault = "kill:step=7:rank=0"
    first = train_2proc(byte_data, run_dir, *memory, fault=fault)
    assert first.returncode != 0 and "exitcode: -9" in first.stderr, first.stderr[-3000:]

    run_folder, = memory_dir.iterdir()
    held = {host.name: sorted(p.name.split(".")[:2] for p in host.iterdir()) for host in run_folder.iterdir()}
    # Each host: its own rank's and its peer's copies of the two newest steps.
    both = [["step_00000004", "rank00000"], ["step_00000004", "rank00001"],
            ["step_00000006", "rank00000"], ["step_00000006", "rank00001"]]
    assert held == {"host0": both, "host1": both}
    shutil.rmtree(run_folder / "host0")

    second = train_2proc(byte_data, run_dir, *memory, fault=fault)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at step 6" in second.stdout
    assert_same_run(run_dir, reference)

    restore, = events(run_dir, "memory_restore")
    assert (restore["step"], restore["loaded_from"], restore["from_peer"]) == (6, "peer", [0])
    assert not events(run_dir, "memory_fallback")
    copies = events(run_dir, "memory_checkpoint")
    assert [e["step"] for e in copies] == [2, 4, 6, 8]
    assert all(e["stall_s"] < 5 and e["bytes"] > 0 for e in copies)
    summary = summarize(RunDir(run_dir))
    assert summary["memory_checkpoints"] == 4 and summary["restarts"] == 1
    assert summary["checkpoint_stall_s"] >= sum(e["stall_s"] for e in copies)
    assert not run_folder.exists()  # the finished run removed its copies
