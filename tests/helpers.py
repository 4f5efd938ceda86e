"""Shared by the tests: the repository root, a small real-code corpus, and the CLI in a subprocess."""

import os
import signal
import subprocess
import sys
from pathlib import Path

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
