"""metrics.jsonl and the live progress display."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path

from rich.console import Console

from gigatrain.paths import write_atomic
from gigatrain.rundir import read_jsonl


def _clean(value):
    # JSON has no NaN/Inf; a diverged loss is written as null rather than breaking readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsFile:
    """Append-only JSON lines: one object per optimizer step or evaluation (metrics.jsonl), or
    per event (events.jsonl). Writes are whole lines and thread-safe: background checkpoint
    saves log from their own thread."""

    def __init__(self, path: Path | None):
        """path None: discard (ranks other than 0 of a multi-process run)."""
        self.path = path
        self._lock = threading.Lock()
        self._file = self._open() if path is not None else None

    def _open(self):
        file = open(self.path, "a+")
        if file.tell() > 0:
            file.seek(file.tell() - 1)
            if file.read(1) != "\n":  # a line torn by a killed process: end it, do not extend it
                file.write("\n")
        return file

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        line = json.dumps({k: _clean(v) for k, v in record.items()}) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (they are about to be recomputed)."""
        if self._file is None:
            return
        with self._lock:
            self._file.close()
            truncate_after(self.path, step)
            self._file = self._open()

    def close(self) -> None:
        if self._file is not None:
            with self._lock:
                self._file.close()


def truncate_after(path: Path, step: int) -> None:
    """Drop records of steps after `step`: a resumed run recomputes them, and each step
    must appear once in the file."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


class ProgressDisplay:
    """A rich progress bar on a terminal; plain periodic lines elsewhere (CI, logs, pipes)."""

    def __init__(self, mode: str, total_steps: int, start_step: int):
        self.total = total_steps
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "plain"
        self.mode = mode
        self.console = Console(highlight=False)
        self.plain_every = max(1, (total_steps - start_step) // 20)
        self._last_plain = time.monotonic()
        self._progress = None
        if mode == "bar":
            # Imported for a terminal's bar only: rich.progress and its tables cost every start
            # (under torchrun, in logs, output is plain) a few tenths of a second.
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self._progress.start()

    def step(self, record: dict) -> None:
        stats = (f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s  "
                 f"MFU {100 * record['mfu']:.1f}%")
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], stats=stats)
        elif self.mode == "plain":
            step = record["step"]
            if step % self.plain_every == 0 or step == self.total or time.monotonic() - self._last_plain > 30:
                self._last_plain = time.monotonic()
                print(f"step {step}/{self.total}  {stats}  lr {record['lr']:.2e}", flush=True)

    def message(self, text: str) -> None:
        if self.mode == "off":
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
