"""Failure injection: GIGATRAIN_FAULT rehearses crashes, hangs, NaNs, slow ranks and failing
checkpoint writes in a real run.

    GIGATRAIN_FAULT="kill:step=7:rank=1;hang:step=4:rank=0;nan:step=5;slow:rank=1:seconds=2;ckpt_fail:step=6"

Each fault fires on one rank (rank=0 unless given). Before it fires, that rank records it
under RUN_DIR/faults/ (one file per fault, named by its text), so a process restarted from
a checkpoint (which replays the steps after it) does not fire it again; a fault written
differently fires anew, and deleting its record re-arms it.
`slow` without a step is a condition, not an event: that rank is slow at every step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from gigatrain.config import ConfigError
from gigatrain.rundir import RunDir

ENV = "GIGATRAIN_FAULT"

# kind -> {key: (type, required)}
KINDS: dict[str, dict[str, tuple[type, bool]]] = {
    "kill": {"step": (int, True), "rank": (int, False), "at": (str, False)},  # SIGKILL itself
    "hang": {"step": (int, True), "rank": (int, False)},  # stop making progress, forever
    "nan": {"step": (int, True), "rank": (int, False), "count": (int, False)},  # NaN gradients
    "slow": {"seconds": (float, True), "rank": (int, False), "step": (int, False)},  # a straggler
    "ckpt_fail": {"step": (int, True), "rank": (int, False)},  # the checkpoint write fails: disk full
}
KILL_AT = ("step", "save")  # mid-step (after the backward pass) or while the checkpoint is written


@dataclass
class Fault:
    kind: str
    step: int | None = None
    rank: int = 0
    seconds: float = 0.0
    count: int = 1
    at: str = "step"
    text: str = ""  # as written in GIGATRAIN_FAULT, normalised
    fired: bool = False
    remaining: int = field(default=0, repr=False)  # nan: steps left to poison

    @property
    def marker_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.text) + ".json"


def parse(text: str) -> list[Fault]:
    """GIGATRAIN_FAULT's value as faults; a bad value is a ConfigError naming it."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, *pairs = item.split(":")
        if kind not in KINDS:
            raise ConfigError(f"{ENV}: unknown fault kind {kind!r} in {item!r}; choose one of: {', '.join(KINDS)}")
        values: dict[str, object] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in KINDS[kind]:
                raise ConfigError(f"{ENV}: {pair!r} in {item!r} is not valid; {kind} takes "
                                  f"{', '.join(k + '=' for k in KINDS[kind])}")
            tp = KINDS[kind][key][0]
            try:
                values[key] = tp(value)
            except ValueError:
                raise ConfigError(f"{ENV}: {key}={value!r} in {item!r} is not {'an integer' if tp is int else 'a number'}") from None
        missing = [k for k, (_, required) in KINDS[kind].items() if required and k not in values]
        if missing:
            raise ConfigError(f"{ENV}: {item!r} needs {', '.join(k + '=' for k in missing)} (e.g. {kind}:{missing[0]}=5)")
        if kind == "kill" and values.get("at", "step") not in KILL_AT:
            raise ConfigError(f"{ENV}: at={values['at']!r} in {item!r} is not valid; choose one of: {', '.join(KILL_AT)}")
        for key in ("step", "count"):
            if key in values and int(values[key]) < 1:
                raise ConfigError(f"{ENV}: {key}={values[key]} in {item!r} is not valid; it must be at least 1")
        if float(values.get("seconds", 0)) < 0 or int(values.get("rank", 0)) < 0:
            raise ConfigError(f"{ENV}: {item!r} is not valid; rank and seconds cannot be negative")
        faults.append(Fault(kind=kind, text=":".join([kind, *pairs]), **values))
    return faults


class FaultPlan:
    """This rank's faults and the hooks the trainer calls; a plan with no faults does nothing."""

    def __init__(self, faults: list[Fault], run_dir: Path, rank: int):
        self.fired_dir = RunDir(run_dir).faults
        self.rank = rank
        self.faults = [f for f in faults if f.rank == rank]
        for fault in self.faults:
            fault.fired = (self._marker(fault)).exists()

    @classmethod
    def from_env(cls, run_dir: Path, rank: int, world_size: int) -> FaultPlan:
        faults = parse(os.environ.get(ENV, ""))
        for fault in faults:
            if fault.rank >= world_size:
                raise ConfigError(f"{ENV}: rank={fault.rank} in {fault.text!r} is not valid; the job has "
                                  f"{world_size} process(es), ranks 0 to {world_size - 1}")
        return cls(faults, run_dir, rank)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def _marker(self, fault: Fault) -> Path:
        return self.fired_dir / fault.marker_name

    def _due(self, kind: str, step: int, at: str | None = None) -> Fault | None:
        for fault in self.faults:
            if fault.kind == kind and not fault.fired and fault.step == step and (at is None or fault.at == at):
                return fault
        return None

    def _fire(self, fault: Fault, step: int) -> None:
        """Record the fault durably before it acts: a kill leaves no chance afterwards."""
        fault.fired = True
        marker = self._marker(fault)
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "w") as file:
            json.dump({"fault": fault.text, "step": step, "rank": self.rank, "time": time.time()}, file)
            file.flush()
            os.fsync(file.fileno())
        print(f"gigatrain: injecting fault {fault.text} at step {step} on rank {self.rank}", flush=True)

    # -- hooks ------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        """Called as step `step` begins, before its batch is loaded."""
        for fault in self.faults:
            if fault.kind == "slow" and (fault.step is None or (fault.step == step and not fault.fired)):
                if fault.step is not None:
                    self._fire(fault, step)
                time.sleep(fault.seconds)
        if fault := self._due("hang", step):
            self._fire(fault, step)
            while True:  # a rank stuck in data loading: its peers wait in the next collective
                time.sleep(3600)

    def after_backward(self, step: int, gradients) -> bool:
        """Called between the backward pass and the update; returns whether the gradients (and
        so the loss reported for the step) are poisoned with NaN."""
        if fault := self._due("kill", step, at="step"):
            self._fire(fault, step)
            os.kill(os.getpid(), signal.SIGKILL)
        poisoned = False
        for fault in self.faults:
            if fault.kind == "nan" and fault.remaining > 0:
                fault.remaining -= 1
                poisoned = True
        if fault := self._due("nan", step):
            self._fire(fault, step)
            fault.remaining = fault.count - 1
            poisoned = True
        if poisoned:  # one NaN reaches every rank through the gradient norm's reduction
            next(g for g in gradients if g.numel() > 0).fill_(float("nan"))
        return poisoned

    def during_save(self, step: int) -> None:
        """Called once a checkpoint's files are written and before it is committed."""
        if fault := self._due("kill", step, at="save"):
            self._fire(fault, step)
            os.kill(os.getpid(), signal.SIGKILL)

    def checkpoint_write_fails(self, step: int) -> bool:
        fault = self._due("ckpt_fail", step)
        if fault:
            self._fire(fault, step)
        return fault is not None
