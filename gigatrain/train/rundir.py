"""A run directory: what it records about itself, and reading a finished run back."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from gigatrain.checkpoint import dcp as checkpoint
from gigatrain.config import Config, ConfigError, from_dict, to_dict, to_toml
from gigatrain.data.loader import TokenData
from gigatrain.data.tokenizers import load_tokenizer
from gigatrain.models.transformer import ModelArgs, Transformer
from gigatrain.paths import sha256_file, write_atomic

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.json"
LOCK_FILE = ".lock"


class RunDirLock:
    """One trainer at a time per run directory: an exclusive flock on RUN_DIR/.lock, which
    the kernel drops when the holder's process ends however it ends (a `kill -9` leaves no
    stale lock). The file stays; after locking, the holder writes its pid and host into it so
    that a refused trainer can name it. (flock works across NFS clients since Linux 2.6.12.)"""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        # O_NOFOLLOW: a .lock planted as a symlink must not make us write outside the run directory.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = self._read_holder()
            os.close(self._fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise ConfigError(f"run directory {run_dir} is in use by another trainer ({holder}); wait for it to "
                              f"finish or stop it, or train in another --run.dir") from None
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


def saved_config(run_dir: Path) -> dict | None:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); fix or remove it") from None


def write_run_files(run_dir: Path, cfg: Config, info: dict) -> None:
    """config.json and config.toml (the effective config) and run.json (provenance)."""
    write_atomic(run_dir / CONFIG_FILE, json.dumps(to_dict(cfg), indent=1) + "\n")
    write_atomic(run_dir / "config.toml", to_toml(cfg))
    write_atomic(run_dir / RUN_FILE, json.dumps({"git_sha": git_sha(), "versions": package_versions(), **info}, indent=1) + "\n")


@dataclass
class LoadedRun:
    cfg: Config
    model: Transformer
    tokenizer: object
    step: int
    device: torch.device


def load_run(run_dir: Path, device: torch.device) -> LoadedRun:
    """The latest checkpoint of a run, ready for evaluation or sampling (one process)."""
    if not (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"{run_dir} is not a gigatrain run directory (no {CONFIG_FILE}); pass the run.dir of a training run")
    cfg = from_dict(saved_config(run_dir))
    info = json.loads((run_dir / RUN_FILE).read_text())
    args = ModelArgs(**info["model_args"])
    with torch.device(device):
        model = Transformer(args)
    restored = checkpoint.restore(run_dir / "checkpoints", [model], report=_warn, repair=False)
    if restored is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet; train it first (gigatrain train --run.dir={run_dir})")
    state = restored[1]
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    return LoadedRun(cfg=cfg, model=model, tokenizer=tokenizer, step=state["step"], device=device)


def _warn(message: str) -> None:
    print(f"gigatrain: warning: {message}", file=sys.stderr)


def model_args_dict(args: ModelArgs) -> dict:
    return dataclasses.asdict(args)


def identity(args: ModelArgs, data: TokenData) -> dict:
    """What a run's checkpoints must be resumed with (saved in each one's trainer state): the
    model's shape (max_seq_len aside: it sizes rotary tables that are computed, not saved), the
    tokenizer (by content) and the data (by its shards' checksums, wherever it lies)."""
    shape = {name: value for name, value in model_args_dict(args).items() if name != "max_seq_len"}
    tokenizer_file = Path(data.path) / data.manifest["tokenizer"]["file"]  # a plain name: TokenData checked it
    shards = {name: [shard["sha256"] for shard in split["shards"]] for name, split in sorted(data.manifest["splits"].items())}
    return {"model": shape,
            "tokenizer": {"kind": data.tokenizer.kind, "vocab_size": data.vocab_size,
                          "sha256": sha256_file(tokenizer_file)},
            "data": {"sha256": hashlib.sha256(json.dumps(shards).encode()).hexdigest(), "path": str(data.path)}}


def identity_differences(saved: dict, current: dict, allow_data_change: bool) -> list[str]:
    """What differs between a checkpoint's identity and this process's, each with its fix."""
    new_run = "start a new run with --run.dir=<new dir>"
    differences = []
    model = [f"model.{name} {saved['model'].get(name)} -> {value}" for name, value in current["model"].items()
             if saved["model"].get(name) != value]
    if model:
        differences.append(f"the model differs ({', '.join(model)}): drop those overrides to resume, or {new_run}")
    old, new = saved["tokenizer"], current["tokenizer"]
    if old != new:
        differences.append(f"the tokenizer differs ({old['kind']}, {old['vocab_size']} tokens, sha256 {old['sha256'][:12]} -> "
                           f"{new['kind']}, {new['vocab_size']} tokens, sha256 {new['sha256'][:12]}): a run cannot change "
                           f"its tokenizer; {new_run}")
    old, new = saved["data"], current["data"]
    if old["sha256"] != new["sha256"] and not allow_data_change:
        differences.append(f"the data differs ({old['path']} -> {new['path']}, other shards): to continue on it on "
                           f"purpose pass --data.allow_change=true, or {new_run}")
    return differences
