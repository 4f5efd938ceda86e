"""Files on disk, below every other module: where gigatrain keeps machine-wide caches (prepared
default corpus, measured CPU peak), atomic writes, files' checksums and the full-disk errors."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

# The errors of a full disk or an exhausted quota, which gigatrain reports as "no space left".
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Bytes read at a time when checksumming: shards and checkpoint files run to gigabytes.
HASH_CHUNK = 8 << 20


def cache_dir() -> Path:
    """$GIGATRAIN_CACHE, else $XDG_CACHE_HOME/gigatrain, else ~/.cache/gigatrain."""
    if os.environ.get("GIGATRAIN_CACHE"):
        path = Path(os.environ["GIGATRAIN_CACHE"])
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gigatrain"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader (or a crash) sees the old file or the new
    one, never a torn one. The temporary name carries the pid: concurrent writers do not collide."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks (checkpoint manifests, data shards, tokenizers)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
