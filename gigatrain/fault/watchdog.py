"""The hang watchdog: a rank that completes no step, evaluation or checkpoint for too long
dumps every thread's stack into the run directory and exits, so that the launcher
(torchrun --max-restarts, Slurm, Kubernetes) restarts the job from its last checkpoint.

A rank stuck in a collective never returns to Python, so the check runs in its own thread;
waits in gloo and NCCL release the GIL, which is all that thread needs.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

from gigatrain.fault import EXIT_HANG
from gigatrain.rundir import RunDir

STARTUP_FACTOR = 5  # loading a checkpoint, and the first step after a (re)start (compilation, warm-up)
PEER_GRACE_S = 30.0  # at most this long (and at most the timeout) a firing rank stays for its peers' stacks


class Watchdog:
    def __init__(self, timeout_s: float, run_dir: Path, rank: int, first: str = "the first step"):
        self.timeout_s = timeout_s
        self.stacks_dir = RunDir(run_dir).stacks
        self.rank = rank
        self._deadline = time.monotonic() + STARTUP_FACTOR * timeout_s
        self._what = first
        self._stop = threading.Event()
        self._fired = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gigatrain-watchdog", daemon=True)
        if timeout_s > 0:
            self._thread.start()

    def beat(self, next_what: str = "a step", startup: bool = False) -> None:
        """Progress was made; the next `next_what` must finish within the timeout (times
        STARTUP_FACTOR for start-up work)."""
        self._hold_if_fired()
        self._deadline = time.monotonic() + self.timeout_s * (STARTUP_FACTOR if startup else 1)
        self._what = next_what

    def stop(self) -> None:
        self._hold_if_fired()
        self._stop.set()

    def _hold_if_fired(self) -> None:
        """A rank whose watchdog fired does no more work, even if its main thread moves on."""
        if self._fired.is_set():
            threading.Event().wait()  # until _fire's exit

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 10)):
            if time.monotonic() > self._deadline:
                self._fire()

    def _fire(self) -> None:
        self._fired.set()
        self.stacks_dir.mkdir(parents=True, exist_ok=True)
        path = self.stacks_dir / f"rank{self.rank}-pid{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
        with open(path, "w") as file:
            file.write(f"gigatrain watchdog: rank {self.rank} waited more than {self.timeout_s:g} s for {self._what}\n\n")
            file.flush()
            faulthandler.dump_traceback(file, all_threads=True)
            file.flush()
            os.fsync(file.fileno())
        print(f"gigatrain: error: watchdog: rank {self.rank} made no progress for {self.timeout_s:g} s "
              f"(waiting for {self._what}); every thread's stack is in {path}; exiting with code {EXIT_HANG} "
              f"so the launcher restarts the job from its last checkpoint", file=sys.stderr, flush=True)
        # The peers stuck with this rank fire at about the same time, but its exit would end
        # them first (gloo fails a collective whose peer is gone), before they write their
        # stacks: so it stays a while, doing nothing, for their watchdogs to fire.
        time.sleep(min(self.timeout_s, PEER_GRACE_S))
        os._exit(EXIT_HANG)  # the main thread is stuck: no clean shutdown is possible
