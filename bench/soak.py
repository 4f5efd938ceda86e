"""Soak: a training job under torchrun --max-restarts while a driver injects random kills
(SIGKILL of a random worker, at random times) and checkpoint-write failures; then the job's
final weights against a fault-free run of the same configuration, and its goodput.

    python bench/soak.py [--steps 1500] [--mtbf 20] [--ckpt-failures 3] [--seed 0] [--recovery storage]

--recovery picks fault.recovery (docs/fault-tolerance.md):
- storage: one torchrun job of two processes restarts from the storage checkpoint;
- memory: the same job with in-memory copies every 5 steps, each process its own "host" with
  its own memory folder; now and then a kill also deletes a host's memory folder (a lost
  host), whose copy its peer still holds;
- replica: a torchft Lighthouse and two replica groups, each its own one-process torchrun job
  on the same run directory; a kill hits a random group's worker, the other group trains on.

The job runs a few minutes (a fault-free run first, then the soak). The last line reports the
faults injected, restarts, steps recomputed, whether the final weights equal the fault-free
run's (storage, memory) or whether every replica group holds the same weights (replica), and
ends with the goodput.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gigatrain.data.prepare import default_corpus_files, prepare  # noqa: E402
from gigatrain.metrics.goodput import summarize  # noqa: E402
from gigatrain.rundir import RunDir  # noqa: E402
from gigatrain.train.checkpointing import load_run  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}
# A dead group is noticed after a second without heartbeats (torchft's default, 5 s, would stall
# the other group that long at every kill of a run whose failures come every 15 s).
LIGHTHOUSE_ARGS = ["--min_replicas", "1", "--quorum_tick_ms", "100", "--join_timeout_ms", "10000",
                   "--heartbeat_timeout_ms", "1000"]
REPLICA_GROUPS = 2


def make_data(folder: Path) -> Path:
    corpus = folder / "corpus"
    corpus.mkdir(parents=True)
    files = [f for f in default_corpus_files() if 2_000 < f.stat().st_size < 20_000][:60]
    for i, path in enumerate(files):
        (corpus / f"doc{i:03d}.py").write_text(path.read_text(encoding="utf-8", errors="replace"))
    prepare([str(corpus)], folder / "data", tokenizer="byte", val_fraction=0.1)
    return folder / "data"


def command(data: Path, run_dir: Path, steps: int, checkpoint_every: int, procs: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
            "--max-restarts=1000", "-m", "gigatrain", "train", "--model.preset=tiny", "--data.seq_len=128",
            "--train.batch_size=16", f"--train.max_steps={steps}", f"--train.checkpoint_every={checkpoint_every}",
            "--train.eval_every=100000", "--train.eval_batches=2", "--train.samples=0", "--train.progress=plain",
            "--train.device=cpu", "--fault.watchdog_s=60", f"--data.path={data}", f"--run.dir={run_dir}"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def workers(launcher: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Job:
    """The training job of one recovery mode: its launchers (one torchrun, or one per replica
    group) with their environments, and for replica mode the Lighthouse they meet at."""

    def __init__(self, recovery: str, data: Path, run_dir: Path, steps: int, checkpoint_every: int, tmp: Path):
        self.recovery, self.run_dir = recovery, run_dir
        self.memory_dir = tmp / f"shm-{run_dir.name}"
        self.lighthouse: list[str] = []
        if recovery == "replica":
            port = free_port()
            self.lighthouse = [str(Path(sys.executable).parent / "torchft_lighthouse"), *LIGHTHOUSE_ARGS,
                               "--bind", f"[::]:{port}"]
            self.commands = [(command(data, run_dir, steps, checkpoint_every, procs=1)
                              + ["--fault.recovery=replica", f"--fault.replica_groups={REPLICA_GROUPS}",
                                 f"--fault.replica_id={group}"],
                              {"TORCHFT_LIGHTHOUSE": f"http://localhost:{port}", "REPLICA_GROUP_ID": str(group)})
                             for group in range(REPLICA_GROUPS)]
        else:
            extra = []
            if recovery == "memory":
                extra = ["--fault.recovery=memory", "--fault.memory_every=5", "--fault.ranks_per_host=1",
                         f"--fault.memory_dir={self.memory_dir}"]
            self.commands = [(command(data, run_dir, steps, checkpoint_every) + extra, {})]

    def run_dirs(self) -> list[Path]:
        """Where each launcher records: replica group i in <run.dir>/replica<i>/."""
        if self.recovery == "replica":
            return [self.run_dir / f"replica{group}" for group in range(REPLICA_GROUPS)]
        return [self.run_dir]

    def lose_a_host(self, rng: random.Random) -> Path | None:
        """memory: delete a random host's memory folder (<memory_dir>/<run id>/host<k>/), as if
        the host were gone."""
        hosts = sorted(p for p in self.memory_dir.glob("*/host*") if p.is_dir()) if self.recovery == "memory" else []
        if not hosts:
            return None
        victim = rng.choice(hosts)
        shutil.rmtree(victim, ignore_errors=True)
        return victim

    def run(self, fault: str = "", killer=None) -> int:
        """Start the Lighthouse (replica) and the launchers; the worst exit code of the launchers."""
        lighthouse = None
        if self.lighthouse:
            lighthouse = subprocess.Popen(self.lighthouse, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
        try:
            launchers = [subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV, **env, "GIGATRAIN_FAULT": fault},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                         for cmd, env in self.commands]
            thread = None
            if killer is not None:
                thread = threading.Thread(target=killer, args=(launchers,), daemon=True)
                thread.start()
            codes = [launcher.wait() for launcher in launchers]
            if thread is not None:
                thread.join()
            return max(codes, key=abs)
        finally:
            if lighthouse is not None:
                lighthouse.kill()
                lighthouse.wait()


def final_weights(run_dir: Path) -> dict:
    return load_run(run_dir, torch.device("cpu")).model.state_dict()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--mtbf", type=float, default=20.0, help="mean seconds between kills")
    parser.add_argument("--ckpt-failures", type=int, default=3, help="checkpoint writes that fail (disk full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recovery", choices=["storage", "memory", "replica"], default="storage",
                        help="fault.recovery of the job (docs/fault-tolerance.md)")
    parser.add_argument("--host-loss", type=float, default=0.3,
                        help="memory: the share of kills that also delete a host's memory folder")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp)
        started = time.perf_counter()
        reference = Job(args.recovery, data, tmp / "reference", args.steps, args.checkpoint_every, tmp)
        assert reference.run() == 0, "the fault-free run failed"
        reference_s = time.perf_counter() - started
        print(f"fault-free run ({args.recovery}): {args.steps} steps in {reference_s:.0f} s", flush=True)

        saves = list(range(args.checkpoint_every, args.steps, args.checkpoint_every))
        failing = sorted(rng.sample(saves, min(args.ckpt_failures, len(saves))))
        ranks = 1 if args.recovery == "replica" else 2  # each replica group is one process
        fault = ";".join(f"ckpt_fail:step={s}:rank={rng.randrange(ranks)}" for s in failing)
        kills, hosts_lost = [], []
        job = Job(args.recovery, data, tmp / "soak", args.steps, args.checkpoint_every, tmp)

        def killer(launchers):
            while True:
                alive = [p for p in launchers if p.poll() is None]
                if not alive:
                    return  # the job finished
                try:
                    alive[0].wait(timeout=rng.expovariate(1 / args.mtbf))
                    continue  # a launcher finished: look again
                except subprocess.TimeoutExpired:
                    pass
                launcher = rng.choice(alive)
                pids = workers(launcher.pid)
                if launcher.poll() is not None or not pids:
                    continue
                victim = rng.choice(pids)
                lost = job.lose_a_host(rng) if rng.random() < args.host_loss else None
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(time.perf_counter())
                    if lost:
                        hosts_lost.append(lost)
                    print(f"  kill -9 worker {victim} at {time.perf_counter() - soak_start:.0f} s"
                          + (f"; memory of {lost.name} deleted" if lost else ""), flush=True)
                except ProcessLookupError:
                    pass

        print(f"soak ({args.recovery}): kills every {args.mtbf:g} s on average; checkpoint writes failing at steps "
              f"{failing}", flush=True)
        soak_start = time.perf_counter()
        code = job.run(fault, killer)
        soak_s = time.perf_counter() - soak_start
        assert code == 0, f"the soak run failed (exit {code})"

        summaries = [summarize(RunDir(d)) for d in job.run_dirs()]
        # The job's goodput: each replica group adds its share while it trains (one group: its own).
        goodput = sum(s["goodput"] for s in summaries) / len(summaries)
        planner = [s["planner_goodput"] for s in summaries]
        planner_goodput = sum(planner) / len(planner) if None not in planner else float("nan")
        failed_writes = sum(len(list(RunDir(d).faults.glob("ckpt_fail*"))) for d in job.run_dirs())
        total = {key: sum(s[key] for s in summaries)
                 for key in ("restart_s", "recomputed_s", "checkpoint_stall_s", "other_s", "restarts", "recomputed_steps")}
        if args.recovery == "replica":
            weights = [final_weights(d) for d in job.run_dirs()]
            same = all(same_weights(weights[0], w) for w in weights[1:])
            verdict = f"all replicas hold identical weights: {'yes' if same else 'NO'}"
        else:
            equal = same_weights(final_weights(tmp / "reference"), final_weights(tmp / "soak"))
            verdict = f"final weights equal the fault-free run's: {'yes' if equal else 'NO'}"
        print(f"soak run: {soak_s:.0f} s wall against {reference_s:.0f} s fault-free; "
              f"restart time {total['restart_s']:.1f} s, recomputed {total['recomputed_s']:.1f} s, "
              f"checkpoint stalls {total['checkpoint_stall_s']:.1f} s, other {total['other_s']:.1f} s"
              + (f"; {len(hosts_lost)} host memory folders deleted" if args.recovery == "memory" else ""))
        print(f"planner's goodput for this run's own failures, restarts and intervals: {planner_goodput:.3f}", flush=True)
        print(f"soak ({args.recovery}): {len(kills) + failed_writes} faults injected ({len(kills)} kills, "
              f"{failed_writes} checkpoint-write failures), {total['restarts']} restarts, "
              f"{total['recomputed_steps']} steps recomputed, {verdict}, goodput {goodput:.3f}")


if __name__ == "__main__":
    main()
