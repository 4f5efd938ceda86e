"""`gigatrain train` itself under torchrun: one node with two processes, two nodes (two
torchrun agents meeting at a c10d rendezvous on 127.0.0.1), and a run started on two
processes that resumes in one, continuing the same metrics file. Then the start-up itself:
a restart in torchrun's shared store, a start-up that cannot complete, and a config error."""

import os
import shlex
import socket
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from gigatrain.rundir import RunDir
from helpers import REPO, TINY, run_cli, run_group, step_values, torchrun

STEPS = ["--train.eval_every=1000", "--train.checkpoint_every=1000", "--train.device=cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, byte_data):
    run_dir = tmp_path_factory.mktemp("torchrun") / "one_process"
    run_cli("train", *TINY, *STEPS, f"--data.path={byte_data}", f"--run.dir={run_dir}", "--train.max_steps=4", check=True)
    return step_values(run_dir)


def test_two_processes_then_one_continue_the_same_run(tmp_path, byte_data, one_process):
    run_dir = tmp_path / "run"
    result = run_group(
        torchrun("--standalone", "--nproc-per-node=2", "-m", "gigatrain", "train", *TINY, *STEPS,
                 f"--data.path={byte_data}", f"--run.dir={run_dir}", "--train.max_steps=2",
                 "--train.schedule_steps=4"), timeout=300)  # the reference's horizon: 4 steps
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(f"run {run_dir}") == 1  # rank 0 alone prints
    assert "2 processes: pp=1 x dp_replicate=1 x dp_shard=2" in result.stdout
    assert RunDir(run_dir).read_run_info()["layout"]["dp_shard"] == 2

    # The saved config keeps dp_shard=-1, so the same run directory resumes in one process.
    run_cli("train", f"--run.dir={run_dir}", "--train.max_steps=4", check=True)
    resumed = step_values(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step, loss in one_process.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5), f"step {step}"
    assert RunDir(run_dir).read_run_info()["world_size"] == 1


def test_two_torchrun_agents_train_as_two_nodes(tmp_path, byte_data, one_process):
    run_dir, port = tmp_path / "two_nodes", free_port()
    command = torchrun("--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=gigatrain-test", "-m", "gigatrain", "train",
                       *TINY, *STEPS, f"--data.path={byte_data}", f"--run.dir={run_dir}", "--train.max_steps=4")
    # Two agents in one session: if they overrun, both and all their workers are killed.
    both = (f"{shlex.join(command)} & first=$!; {shlex.join(command)} & second=$!; "
            f"wait $first; a=$?; wait $second; b=$?; exit $((a | b))")
    result = run_group(["bash", "-c", both], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert RunDir(run_dir).read_run_info()["world_size"] == 2
    trained = step_values(run_dir)
    for step, loss in one_process.items():
        assert trained[step] == pytest.approx(loss, rel=1e-5), f"step {step}"


def agent_store() -> dist.TCPStore:
    """A store like the one torchrun's agent hosts and keeps across restarts (TCPStore sharing)."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def worker_env(store: dist.TCPStore, rank: int) -> dict:
    """What torchrun gives a worker of a two-process job that shares its store."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}


# Joins the process group after argv[2] seconds, then sums each rank's rank+1 over it and over
# a group made from it (the checkpointer makes one).
WORKER = """import sys, time
from pathlib import Path
import torch, torch.distributed as dist
from gigatrain.parallel.mesh import init_distributed
time.sleep(float(sys.argv[2]))
init_distributed(torch.device("cpu"), 60, Path(sys.argv[1]))
group = dist.new_group(backend="gloo")
for g in (None, group):
    total = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(total, group=g)
    print(int(total.item()), flush=True)
dist.destroy_process_group()
"""


def start_workers(store, run_dir, late_rank_delay=0.0) -> list[subprocess.CompletedProcess]:
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(run_dir), str(late_rank_delay if rank else 0)],
                                cwd=REPO, env=worker_env(store, rank), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for rank in (0, 1)]
    results = []
    for worker in workers:
        try:
            stdout, stderr = worker.communicate(timeout=120)
        finally:
            worker.kill()
        results.append(subprocess.CompletedProcess(worker.args, worker.returncode, stdout, stderr))
    return results


def test_a_restarted_group_never_reads_its_predecessors_keys(tmp_path):
    """torchrun keeps its store across restarts: the second start's rank 0 finds the first
    start's rank-1 address there, and must not use it while the new rank 1 comes late."""
    store = agent_store()
    for late_rank_delay in (0.0, 3.0):  # the first start, then the restart
        for worker in start_workers(store, tmp_path, late_rank_delay):
            assert worker.returncode == 0, worker.stderr[-3000:]
            assert worker.stdout.split() == ["3", "3"]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_start_up_that_cannot_complete_ends_within_its_bound(tmp_path, byte_data, rank):
    """A world of two whose other process never comes: this one stops after
    fault.startup_timeout_s, with its stacks and a line naming the phase, instead of waiting
    for the store's half hour."""
    run_dir, store = tmp_path / "run", agent_store()
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "gigatrain", "train", *TINY, "--train.device=cpu",
                             f"--data.path={byte_data}", f"--run.dir={run_dir}", "--fault.startup_timeout_s=2"],
                            cwd=REPO, env=worker_env(store, rank), capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert (f"gigatrain: error: watchdog: rank {rank} made no progress for 2 s "
            f"(waiting for start-up: all 2 processes to reach the rendezvous)") in result.stderr
    stacks, = RunDir(run_dir).stacks.glob(f"rank{rank}-*")
    assert "in start_namespace" in stacks.read_text()


def test_a_config_error_under_torchrun_is_printed_once(tmp_path):
    """Both ranks meet it; rank 0 prints it, and torchrun's summary names it as the root cause."""
    result = run_group(torchrun("--standalone", "--nproc-per-node", "2", "-m", "gigatrain", "train", "configs/tiny.toml",
                                "--parallel.tp=3", f"--run.dir={tmp_path / 'run'}"), timeout=180)
    assert result.returncode == 1  # torchrun's code for any failed worker
    error = "gigatrain: error: parallel.dp_shard=-1 cannot be inferred"
    printed = [line for line in result.stderr.splitlines() if line.startswith("gigatrain: error:")]
    assert len(printed) == 1 and printed[0].startswith(error), result.stderr
    root_cause = result.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 0 (local_rank: 0)" in root_cause and "exitcode  : 2" in root_cause
    assert f"traceback : {error}" in root_cause
