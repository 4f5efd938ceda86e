"""Warm spares (gigatrain.fault.spare) in a real two-process gloo job under torchrun: every
restart trains in a fork of the spare, the stand-in's death is its trainer's, its signals are
the trainer's, and the run stays bit-identical to the uninterrupted reference. The same job
is the drill of Slurm's time-limit warning (SIGUSR1 to one rank): both ranks agree to stop,
checkpoint and exit 75, and the requeued job resumes bit-exact."""

import os
import signal
import subprocess
import time
from pathlib import Path

from gigatrain.fault import EXIT_REQUEUE
from gigatrain.rundir import RunDir
from fault_runs import BASE, STEPS, assert_same_run, events, train_2proc
from helpers import REPO, children, kill_tree, step_values, torchrun

WAIT_S = 120


def wait_until(condition, process, what):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert process.poll() is None, f"the job ended while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S} s"
        time.sleep(0.05)


def test_restarts_train_in_the_spare_which_obeys_its_stand_in_then_sigusr1_requeues(tmp_path, byte_data, reference):
    """Rank 1 is killed at step 3 (the first restart comes from the spares); then rank 0's
    stand-in is SIGKILLed (its trainer must die with it: a second restart, from the spares
    again); then SIGUSR1 to a stand-in reaches its trainer, which checkpoints and exits 75,
    as does its stand-in. The requeued job finishes the run, bit-identical to the reference."""
    run_dir = tmp_path / "run"
    spares_before = set(spare_sockets())
    command = torchrun("--standalone", "--nproc-per-node=2", "--max-restarts=2", "-m", "gigatrain", "train", *BASE,
                       f"--data.path={byte_data}", f"--run.dir={run_dir}")
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               env={**os.environ, "GIGATRAIN_FAULT": "kill:step=3:rank=1;slow:rank=1:seconds=0.3"})
    try:
        wait_until(lambda: len(events(run_dir, "restart")) == 1, process, "first restart")
        os.kill(children(process.pid)[0], signal.SIGKILL)
        wait_until(lambda: len(events(run_dir, "restart")) == 2, process, "second restart")
        wait_until(lambda: max(step_values(run_dir), default=0) > events(run_dir, "restart")[1]["step"] + 1, process,
                   "a step after the second restart")
        os.kill(children(process.pid)[-1], signal.SIGUSR1)
        stdout, stderr = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
    restarts = events(run_dir, "restart")
    assert [r["warm_spare"] for r in restarts] == [True, True], restarts
    assert events(run_dir, "startup")[0]["warm_spare"] is False  # the job's first start is cold
    # The stand-ins passed torchrun each trainer's end: SIGKILL (-9) twice, then the requeue code.
    assert stderr.count("exitcode: -9") >= 2 and f"exitcode: {EXIT_REQUEUE}" in stderr, stderr[-3000:]
    stopped_at = max(step_values(run_dir))
    assert f"stopped by SIGUSR1 at step {stopped_at}" in stdout and stopped_at < STEPS
    assert events(run_dir, "stop")[-1]["reason"] == "SIGUSR1"
    assert (RunDir(run_dir).checkpoints / f"step_{stopped_at:08d}" / "manifest.json").exists()

    result = train_2proc(byte_data, run_dir)  # the requeued job, which has no restarts and so no spare
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed at step {stopped_at}" in result.stdout
    requeued = events(run_dir, "restart")[-1]
    assert requeued["after"] == "preemption" and requeued["warm_spare"] is False
    assert_same_run(run_dir, reference)
    # The spares went with their jobs (each when its torchrun ended): no socket of theirs is left.
    deadline = time.monotonic() + 5
    while set(spare_sockets()) - spares_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(spare_sockets()) - spares_before


def spare_sockets():
    folder = Path("/dev/shm") / f"gigatrain-spares-{os.getuid()}"
    return list(folder.glob("*.sock")) if folder.is_dir() else []
