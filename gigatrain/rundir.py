"""A run directory: the one place that names its files. Every reader and writer of a run goes
through `RunDir`, so a file is named once, and a line torn by a crash is read the same way
everywhere (skipped: the process died mid-write, the lines before it stand).

    RUN_DIR/
      config.json, config.toml   the effective config (JSON is what resume reads)
      run.json                   provenance: versions, git sha, device, layout, model shape
      metrics.jsonl              one line per step and per evaluation
      events.jsonl               starts, stops, checkpoints, restarts, skips, rollbacks
      tokenizer.json             the run's tokenizer
      checkpoints/step_N/        DCP checkpoints (gigatrain.checkpoint.dcp)
      samples.txt, loss.png, throughput.png
      faults/                    which injected faults have fired (GIGATRAIN_FAULT)
      stacks/                    every thread's stack, written by a watchdog that fired
      launch/                    the Slurm script and its job logs (gigatrain launch slurm)
      .lock                      held by the one trainer of this directory
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

from gigatrain.config import Config, ConfigError, apply_overrides, from_dict, load_config
from gigatrain.data.tokenizers import TOKENIZER_FILE
from gigatrain.models.transformer import ModelArgs
from gigatrain.paths import write_atomic


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file ([] if there is none yet); a torn line is skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
    return records


def git_sha() -> str:
    """The commit of the gigatrain source tree, or 'unknown' outside a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("gigatrain", "numpy", "tokenizers", "safetensors", "rich", "matplotlib", "pyarrow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class RunDir:
    """The files of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- names ------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def config_toml(self) -> Path:
        return self.path / "config.toml"

    @property
    def run_info(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def memory_token(self) -> Path:
        """fault.recovery=memory: names the run's folder of in-memory copies (train/memory.py)."""
        return self.path / "memory_token"

    @property
    def samples(self) -> Path:
        return self.path / "samples.txt"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def throughput_plot(self) -> Path:
        return self.path / "throughput.png"

    @property
    def expert_load_plot(self) -> Path:
        return self.path / "expert_load.png"

    @property
    def faults(self) -> Path:
        return self.path / "faults"

    @property
    def stacks(self) -> Path:
        return self.path / "stacks"

    @property
    def launch(self) -> Path:
        return self.path / "launch"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    # -- reading ----------------------------------------------------------------------------
    def is_run(self) -> bool:
        return self.config.is_file()

    def require_run(self) -> None:
        """One line, exit 2 in the CLI, for a folder that is not a run directory."""
        if not self.is_run():
            raise ConfigError(f"{self.path} is not a gigatrain run directory (no {self.config.name}); "
                              f"pass the run.dir of a training run")

    def read_config(self) -> dict | None:
        """config.json as saved (None: a new run)."""
        return self._read_json(self.config)

    def read_run_info(self) -> dict | None:
        return self._read_json(self.run_info)

    def model_args(self) -> ModelArgs:
        """The model's shape, as training recorded it in run.json (what eval, generate and
        export build the model from); one line for a folder that is not a trained run."""
        self.require_run()
        info = self.read_run_info() or {}
        try:
            return ModelArgs(**info["model_args"])
        except (TypeError, KeyError) as err:
            raise ConfigError(f"{self.run_info} is missing or holds no valid model_args ({type(err).__name__}: {err}); "
                              f"it is written when training starts: train the run (gigatrain train "
                              f"--run.dir={self.path})") from None

    def metrics_records(self) -> list[dict]:
        return read_jsonl(self.metrics)

    def event_records(self) -> list[dict]:
        return read_jsonl(self.events)

    @staticmethod
    def _read_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); fix or remove it") from None

    # -- writing ----------------------------------------------------------------------------
    def write_config(self, config: dict, toml_text: str) -> None:
        """config.json (what resume reads) and config.toml (the same, for people), each atomic."""
        write_atomic(self.config, json.dumps(config, indent=1) + "\n")
        write_atomic(self.config_toml, toml_text)

    def write_run_info(self, info: dict) -> None:
        """run.json: `info`, after the provenance every run records (the source's commit, the versions)."""
        write_atomic(self.run_info, json.dumps({"git_sha": git_sha(), "versions": package_versions(), **info},
                                               indent=1) + "\n")

    def lock(self) -> RunDirLock:
        return RunDirLock(self)


class RunDirLock:
    """One trainer at a time per run directory: an exclusive flock on RUN_DIR/.lock, which
    the kernel drops when the holder's process ends however it ends (a `kill -9` leaves no
    stale lock). The file stays; after locking, the holder writes its pid and host into it so
    that a refused trainer can name it. (flock works across NFS clients since Linux 2.6.12.)"""

    def __init__(self, run_dir: RunDir):
        run_dir.path.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a .lock planted as a symlink must not make us write outside the run directory.
        self._fd = os.open(run_dir.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = self._read_holder()
            os.close(self._fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise ConfigError(f"run directory {run_dir.path} is in use by another trainer ({holder}); wait for it "
                              f"to finish or stop it, or train in another --run.dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def _read_holder(self) -> str:
        """'pid P on host H', from what the holder wrote just after locking (it may not have yet)."""
        for _ in range(20):
            fields = os.pread(self._fd, 300, 0).decode("utf-8", "replace").split()
            if len(fields) == 2 and fields[0].isdigit():
                return f"pid {fields[0]} on host {fields[1]}"
            time.sleep(0.05)
        return "pid and host not recorded yet"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def resolve_run_config(config_path: str | None, overrides: list[str]) -> Config:
    """A new run: defaults, the TOML file, the overrides. An existing run directory: its saved
    config plus the overrides, so `gigatrain train --run.dir=D` continues run D as it was."""
    cfg = load_config(config_path, overrides)
    saved = RunDir(cfg.run_dir).read_config()
    if saved is None or config_path is not None:
        return cfg
    resumed = from_dict(saved)
    apply_overrides(resumed, overrides)
    return resumed
