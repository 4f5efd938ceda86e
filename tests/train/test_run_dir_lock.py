"""One trainer at a time per run directory: the lock on RUN_DIR/.lock, in process, between
processes started together, after a `kill -9`, and for a torchrun job."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO, TINY, kill_tree, run_group, step_values, torchrun
from gigatrain.config import ConfigError
from gigatrain.rundir import RunDir, resolve_run_config
from gigatrain.train.trainer import train

# Slow steps keep a trainer holding its run directory while another one tries it.
SLOW = {"GIGATRAIN_FAULT": "slow:rank=0:seconds=0.1"}


def cli_args(run_dir, data, *extra):
    return [*TINY, "--train.device=cpu", f"--data.path={data}", f"--run.dir={run_dir}", *extra]


def start_trainer(run_dir, data, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "gigatrain", "train", *cli_args(run_dir, data, *extra)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})


def refusal(run_dir, pid):
    return (f"gigatrain: error: run directory {run_dir} is in use by another trainer (pid {pid} on host "
            f"{socket.gethostname()}); wait for it to finish or stop it, or train in another --run.dir\n")


def test_a_held_run_directory_is_refused_before_anything_in_it_is_touched(tmp_path, byte_data):
    run_dir = tmp_path / "run"
    holder = RunDir(run_dir).lock()
    with pytest.raises(ConfigError, match=re.escape(refusal(run_dir, os.getpid())[len("gigatrain: error: "):-1])):
        train(resolve_run_config(None, cli_args(run_dir, byte_data, "--train.max_steps=2")))
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    holder.release()
    assert train(resolve_run_config(None, cli_args(run_dir, byte_data, "--train.max_steps=2"))).step == 2
    # The trainer let go of it when it closed: the next one (here, this test) gets it at once.
    RunDir(run_dir).lock().release()


def test_two_trainers_started_together_one_trains_the_other_is_refused(tmp_path, byte_data):
    run_dir = tmp_path / "race"
    steps = 20
    trainers = [start_trainer(run_dir, byte_data, f"--train.max_steps={steps}", env=SLOW) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=240) for p in trainers]
    finally:
        for p in trainers:
            kill_tree(p.pid)
    codes = sorted(p.returncode for p in trainers)
    assert codes == [0, 2], outputs
    winner, loser = (0, 1) if trainers[0].returncode == 0 else (1, 0)
    assert outputs[loser][1] == refusal(run_dir, trainers[winner].pid)
    assert sorted(step_values(run_dir)) == list(range(1, steps + 1))  # the winner's metrics, complete
    assert f"stopped by max_steps at step {steps}" in outputs[winner][0]


def test_a_kill_9_leaves_no_stale_lock(tmp_path, byte_data):
    run_dir = tmp_path / "run"
    holder = start_trainer(run_dir, byte_data, "--train.max_steps=1000", env=SLOW)
    try:
        deadline = time.monotonic() + 120
        while not step_values(run_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert step_values(run_dir), "the first trainer never trained"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        kill_tree(holder.pid)
    assert holder.returncode == -signal.SIGKILL
    RunDir(run_dir).lock().release()  # the next trainer gets it at once


def test_a_torchrun_job_is_refused_with_rank_0s_line(tmp_path, byte_data):
    run_dir = tmp_path / "run"
    holder = RunDir(run_dir).lock()
    command = torchrun("--standalone", "--nproc-per-node=2", "-m", "gigatrain", "train",
                       *cli_args(run_dir, byte_data, "--train.max_steps=2"))
    result = run_group(command, timeout=240)
    holder.release()
    assert result.returncode != 0
    # Every rank stops; rank 0 prints the line (the others wait for torchrun to stop them, cli._report).
    printed = [line + "\n" for line in result.stderr.splitlines() if line.startswith("gigatrain: error:")]
    assert printed == [refusal(run_dir, os.getpid())], result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
