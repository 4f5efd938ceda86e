"""Startup and restart: how long a fresh two-process CPU job takes to its first step, and how long
it takes, after a worker is killed (SIGKILL from this driver), until torchrun's restarted job
has done its first step; median over the kills, and per phase from the run's `startup` and
`restart` events (docs/fault-tolerance.md, "Where restart time goes").

    python bench/startup.py [--recovery storage|memory] [--kills 5] [--baseline DIR | --cold]
                            [--procs 2] [--override=--section.key=value ...]

`--recovery MODE` is passed to the job as --fault.recovery=MODE. `--baseline DIR` also measures
the same job run from another gigatrain checkout (e.g. the main branch before a change), kill by
kill in turn with this one (the job not being measured is paused), so that before and after
meet the same load on a busy machine; a checkout that records no phases is reported by its
totals. `--cold` measures, the same way, this checkout's job without warm spares
(--fault.warm_spare=false): every restart imports everything again. `--procs` and `--override`
change the job (e.g. one process on a GPU: `--procs 1 --override=--train.device=cuda
--override=--model.preset=gpt2-124m`). The last line reads
`restart median X.XX s (...phases...)` for this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from soak import make_data, workers  # noqa: E402

CHECKPOINT_EVERY = 5
STEPS_BETWEEN_KILLS = 3  # steps after a restart's first step before the next kill: its events are written
WAIT_S = 180.0


def command(data: Path, run_dir: Path, recovery: str, kills: int, procs: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
            f"--max-restarts={kills}", "-m", "gigatrain", "train", "--model.preset=tiny", "--data.seq_len=128",
            "--train.batch_size=16", "--train.max_steps=1000000", f"--train.checkpoint_every={CHECKPOINT_EVERY}",
            "--train.eval_every=1000000", "--train.samples=0", "--train.progress=plain", "--train.device=cpu",
            f"--fault.recovery={recovery}", f"--data.path={data}", f"--run.dir={run_dir}", *overrides]


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file another process is writing."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the line being written
    return records


def wait_for(what: str, condition, process: subprocess.Popen):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the job ended (exit {process.returncode}) while waiting for {what}")
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise SystemExit(f"no {what} within {WAIT_S:.0f} s")


class Job:
    """One job from a gigatrain checkout: its launch to the first step, then kills of a worker,
    each timed from the kill to the first step of the restarted job. Between measurements a job
    can be paused (SIGSTOP to its whole session), so that two checkouts are measured kill by kill
    in turn while the other one takes no CPU."""

    def __init__(self, checkout: Path, data: Path, run_dir: Path, recovery: str, kills: int, procs: int,
                 overrides: list[str]):
        self.run_dir = run_dir
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(checkout), "GIGATRAIN_FAULT": ""}
        launched = time.time()
        self.process = subprocess.Popen(command(data, run_dir, recovery, kills, procs, overrides), cwd=checkout, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            first = wait_for("first step", self.steps, self.process)[0]
        except BaseException:
            self.kill()
            raise
        self.fresh_s = first["time"] - launched
        self.restarts: list[float] = []

    def steps(self) -> list[dict]:
        return [r for r in read_jsonl(self.run_dir / "metrics.jsonl") if "loss" in r]

    def starts(self) -> list[dict]:
        return [e for e in read_jsonl(self.run_dir / "events.jsonl") if e.get("event") == "start"]

    def processes(self) -> list[int]:
        """torchrun, its workers (in sessions of their own) and, with warm spares, the spares and
        the trainers forked from them (children of neither): every process whose command line
        names this job's run directory."""
        found = subprocess.run(["pgrep", "-f", "--", f"--run.dir={self.run_dir}"], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    def signal_all(self, sig: int) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        self.signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal_all(signal.SIGCONT)

    def settled(self) -> None:
        """A committed checkpoint to restart from, and a few steps done since the last start
        (its startup or restart event is written by then)."""
        wait_for("a checkpoint", lambda: any((self.run_dir / "checkpoints").glob("step_*")), self.process)
        after = self.steps()[-1]["step"] + STEPS_BETWEEN_KILLS
        wait_for(f"step {after}", lambda: self.steps()[-1]["step"] >= after, self.process)

    def kill_once(self) -> None:
        self.settled()
        n_starts = len(self.starts())
        victim = max(workers(self.process.pid))
        killed = time.time()
        os.kill(victim, signal.SIGKILL)
        start = wait_for("the restarted job's start", lambda: self.starts()[n_starts:], self.process)[0]
        step = wait_for("the restarted job's first step",
                        lambda: [r for r in self.steps() if r["time"] > start["time"]], self.process)[0]
        self.restarts.append(step["time"] - killed)

    def kill(self) -> None:
        """End the job, every process of it (a SIGKILLed launcher cannot stop its workers)."""
        self.signal_all(signal.SIGKILL)
        self.process.wait()

    def finish(self) -> dict:
        self.settled()
        self.kill()
        recorded = read_jsonl(self.run_dir / "events.jsonl")
        return {"fresh_s": self.fresh_s, "restarts": self.restarts,
                "startup": next((e for e in recorded if e.get("event") == "startup"), None),
                "restart_events": [e for e in recorded if e.get("event") == "restart" and "phases" in e],
                "memory_copies": [e for e in recorded if e.get("event") == "memory_checkpoint"]}


def median_phases(records: list[dict]) -> dict:
    return {name.removesuffix("_s"): statistics.median(r["phases"][name] for r in records) for name in records[0]["phases"]}


def phase_text(phases: dict) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items())


def report(label: str, result: dict) -> None:
    startup = result["startup"]
    line = f"{label}: fresh job, launch to first step {result['fresh_s']:.2f} s"
    if startup is not None:
        line += f"; trainer process start to first step {startup['startup_s']:.2f} s ({phase_text(median_phases([startup]))})"
    print(line, flush=True)
    kills = ", ".join(f"{s:.2f}" for s in result["restarts"])
    line = (f"{label}: restart median {statistics.median(result['restarts']):.2f} s kill-to-first-step "
            f"over {len(result['restarts'])} kills ({kills})")
    events = result["restart_events"]
    if events:
        sources = sorted({str(e["loaded_from"]) for e in events})
        line += (f"; restart events' median {statistics.median(e['restart_s'] for e in events):.2f} s from the last "
                 f"sign of life, loaded from {', '.join(sources)}")
    print(line, flush=True)
    copies = result["memory_copies"]
    if copies:
        print(f"{label}: {len(copies)} in-memory copies of {copies[-1]['bytes'] / 1e6:,.1f} MB (rank 0's), training stalled "
              f"{1e3 * statistics.median(e['stall_s'] for e in copies):.1f} ms median, "
              f"{1e3 * max(e['stall_s'] for e in copies):.1f} ms at most", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recovery", choices=["storage", "memory"], default="storage",
                        help="passed as --fault.recovery=MODE")
    parser.add_argument("--kills", type=int, default=5)
    compare = parser.add_mutually_exclusive_group()
    compare.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                         help="another gigatrain checkout (e.g. before a change), measured on the same data, kill by kill in turn")
    compare.add_argument("--cold", action="store_true",
                         help="also this checkout without warm spares (--fault.warm_spare=false), kill by kill in turn")
    parser.add_argument("--procs", type=int, default=2, help="processes (torchrun --nproc-per-node)")
    parser.add_argument("--override", action="append", default=[], metavar="--SECTION.KEY=VALUE",
                        help="a config override for the job (repeatable)")
    args = parser.parse_args()

    # Workers killed with their session may still be exiting as the folder is removed.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        tmp = Path(tmp)
        data = make_data(tmp)
        checkouts = {"this": (REPO, args.override)}
        if args.baseline is not None:
            checkouts = {"baseline": (args.baseline.resolve(), args.override), **checkouts}
        if args.cold:
            checkouts = {"cold": (REPO, [*args.override, "--fault.warm_spare=false"]), **checkouts}
        jobs = {}
        try:
            for name, (checkout, overrides) in checkouts.items():
                jobs[name] = Job(checkout, data, tmp / name, args.recovery, args.kills, args.procs, overrides)
                jobs[name].pause()
            for _ in range(args.kills):
                for job in jobs.values():  # in turn, kill by kill: the machine's load falls on both alike
                    job.resume()
                    job.kill_once()
                    job.pause()
            results = {}
            for name, job in jobs.items():
                job.resume()
                results[name] = job.finish()
        finally:
            for job in jobs.values():
                if job.process.poll() is None:
                    job.kill()
        if args.baseline is not None:
            report(f"baseline {args.baseline}", results["baseline"])
        if args.cold:
            report(f"cold restarts ({args.recovery}, --fault.warm_spare=false)", results["cold"])
        result = results["this"]
        report(f"this checkout ({args.recovery})", result)
        kills = statistics.median(result["restarts"])
        events = result["restart_events"]
        phases = phase_text(median_phases(events)) if events else "no phases recorded"
        print(f"restart median {kills:.2f} s ({phases})")

if __name__ == "__main__":
    main()
