"""`gigatrain train` itself under torchrun: one node with two processes, two nodes (two
torchrun agents meeting at a c10d rendezvous on 127.0.0.1), and a run started on two
processes that resumes in one, continuing the same metrics file."""

import json
import shlex
import socket

import pytest

from helpers import TINY, run_cli, run_group, step_values, torchrun

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
                 f"--data.path={byte_data}", f"--run.dir={run_dir}", "--train.max_steps=2"), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(f"run {run_dir}") == 1  # rank 0 alone prints
    assert "2 processes: pp=1 x dp_replicate=1 x dp_shard=2" in result.stdout
    assert json.loads((run_dir / "run.json").read_text())["layout"]["dp_shard"] == 2

    # The saved config keeps dp_shard=-1, so the same run directory resumes in one process.
    run_cli("train", f"--run.dir={run_dir}", "--train.max_steps=4", check=True)
    resumed = step_values(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step, loss in one_process.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5), f"step {step}"
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 1


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
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    trained = step_values(run_dir)
    for step, loss in one_process.items():
        assert trained[step] == pytest.approx(loss, rel=1e-5), f"step {step}"
