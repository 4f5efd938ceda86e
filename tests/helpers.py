"""Shared by the tests: the repository root, a small real-code corpus, and the CLI in a subprocess."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def write_corpus(folder: Path, n_files: int = 24, offset: int = 0) -> Path:
    """A small corpus of real Python source: standard-library files, present on every machine."""
    from gigatrain.data.prepare import default_corpus_files

    folder.mkdir(parents=True, exist_ok=True)
    files = [f for f in default_corpus_files() if 2_000 < f.stat().st_size < 12_000][offset : offset + n_files]
    for i, path in enumerate(files):
        (folder / f"doc{i:03d}_{path.name}").write_text(path.read_text(encoding="utf-8", errors="replace"))
    return folder


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m gigatrain ARGS` in a subprocess, as a user would run it."""
    result = subprocess.run([sys.executable, "-m", "gigatrain", *args], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"gigatrain {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def step_values(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """metrics.jsonl's `key` by step."""
    from gigatrain.rundir import RunDir

    return {r["step"]: r[key] for r in RunDir(run_dir).metrics_records() if key in r}


def final_weights(run_dir: Path) -> dict:
    """The run's latest checkpoint loaded strictly into a plain one-process model (whatever
    layout wrote it), as a state dict: what `gigatrain eval` and `generate` load."""
    import torch

    from gigatrain.train.checkpointing import load_run

    return load_run(run_dir, torch.device("cpu")).model.state_dict()


def assert_weights_match(got, expected, name: str) -> None:
    """A layout's final weights against one process's (tests/parallel/test_layouts.py says why
    one element in a thousand may be further off)."""
    import torch

    close = torch.isclose(got, expected, rtol=1e-5, atol=1e-6)
    assert close.float().mean() >= 0.999, f"{name}: {int((~close).sum())} of {close.numel()} elements differ"
    worst = (got - expected).abs().max().item()
    assert worst <= 5e-5, f"{name}: an element differs by {worst:.2e}"


def model_and_optimizer(seed: int):
    """The tiny preset's model and an AdamW that has taken one step (so it has state to save)."""
    import torch

    from gigatrain.models.presets import get_preset
    from gigatrain.models.transformer import Transformer

    model = Transformer(get_preset("tiny"), seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(2, 8, dtype=torch.long)).sum().backward()
    optimizer.step()
    return model, optimizer


def run_name(label: str) -> str:
    """A run directory's name for a test's label ("EP 2 x FSDP" -> "EP_2_x_FSDP")."""
    return "".join(c if c.isalnum() else "_" for c in label)


def train_one_process(data: Path, run_dir: Path, overrides: list[str]):
    """Train in this process (the reference the parallel runs are compared with)."""
    from gigatrain.config import load_config
    from gigatrain.train.trainer import train

    return train(load_config(None, [f"--data.path={data}", f"--run.dir={run_dir}", *overrides]))


def run_layouts_job(data: Path, out: Path, plan: list[dict], timeout: float) -> str:
    """The plan's runs and checks in one `torchrun --nproc-per-node 4` job, one process group
    (tests/parallel/layouts_worker.py says what an entry holds); returns its stdout."""
    import json

    result = run_group(torchrun("--nproc-per-node=4", "--standalone", str(REPO / "tests/parallel/layouts_worker.py"),
                                str(data), str(out), json.dumps(plan)), timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


def assert_steps_match(reference: Path, parallel: Path, rel: float = 1e-5, steps: int = 3) -> None:
    """Every step's loss and gradient norm of a parallel run against the one-process run's.
    Adam is blind to the scale of the gradient, so the gradient norm is compared too: a
    missing or doubled average would show there."""
    for key in ("loss", "grad_norm"):
        expected, got = step_values(reference, key), step_values(parallel, key)
        assert sorted(got) == list(range(1, steps + 1)) and sorted(expected) == sorted(got), f"{key}: {sorted(got)}"
        for step in expected:
            assert got[step] == pytest.approx(expected[step], rel=rel), f"{key} at step {step}"


def assert_resumes_in_one_process(saved: Path, reference: Path, data: Path, overrides: list[str], tmp_path: Path,
                                  rel: float) -> None:
    """A checkpoint saved at step 2 by a parallel run, resumed in one process: its step 3 is
    the uninterrupted one-process run's (resharding to one process)."""
    import shutil

    run_dir = tmp_path / "one_process_resume"
    shutil.copytree(saved, run_dir)
    assert train_one_process(data, run_dir, overrides).step == 3
    assert step_values(run_dir)[3] == pytest.approx(step_values(reference)[3], rel=rel)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def children(pid: int) -> list[int]:
    """The processes `pid` started, oldest first."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts each worker in a session
    of its own, so killing the launcher's session alone would leave them running)."""
    for child in children(pid):
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_group(command: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher (torchrun, several agents...) in its own session and, if it overruns,
    kill the session and every process under it."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               start_new_session=True, env={**os.environ, **(env or {})})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command[:6])} ... did not finish in {timeout} s:\n{stderr[-4000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


TINY = ["--model.preset=tiny", "--data.seq_len=64", "--train.batch_size=8", "--train.eval_batches=2",
        "--train.samples=0", "--train.progress=plain", "--train.warmup_steps=2"]


def rehash(checkpoint_folder: Path) -> None:
    """What a tamperer does to pass verification: rewrite a checkpoint's manifest to match its files."""
    import json

    from gigatrain.checkpoint.dcp import MANIFEST_FILE
    from gigatrain.paths import sha256_file

    manifest = json.loads((checkpoint_folder / MANIFEST_FILE).read_text())
    for name in manifest["files"]:
        path = checkpoint_folder / name
        manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (checkpoint_folder / MANIFEST_FILE).write_text(json.dumps(manifest))
