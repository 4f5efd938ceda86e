"""Soak: a two-process training job under torchrun --max-restarts while a driver injects random
kills (SIGKILL of a random worker, at random times) and checkpoint-write failures; then the
job's final weights against a fault-free run of the same configuration, and its goodput.

    python bench/soak.py [--steps 1500] [--mtbf 20] [--ckpt-failures 3] [--seed 0]

The job runs a few minutes (a fault-free run first, then the soak). The last line reports the
faults injected, restarts, steps recomputed, goodput, and whether the final weights equal the
fault-free run's.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
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


def make_data(folder: Path) -> Path:
    corpus = folder / "corpus"
    corpus.mkdir(parents=True)
    files = [f for f in default_corpus_files() if 2_000 < f.stat().st_size < 20_000][:60]
    for i, path in enumerate(files):
        (corpus / f"doc{i:03d}.py").write_text(path.read_text(encoding="utf-8", errors="replace"))
    prepare([str(corpus)], folder / "data", tokenizer="byte", val_fraction=0.1)
    return folder / "data"


def command(data: Path, run_dir: Path, steps: int, checkpoint_every: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "--max-restarts=1000", "-m", "gigatrain", "train", "--model.preset=tiny", "--data.seq_len=128",
            "--train.batch_size=16", f"--train.max_steps={steps}", f"--train.checkpoint_every={checkpoint_every}",
            "--train.eval_every=100000", "--train.eval_batches=2", "--train.samples=0", "--train.progress=plain",
            "--train.device=cpu", "--fault.watchdog_s=60", f"--data.path={data}", f"--run.dir={run_dir}"]


def workers(launcher: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def run(cmd: list[str], fault: str = "", killer=None) -> int:
    process = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV, "GIGATRAIN_FAULT": fault},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    thread = None
    if killer is not None:
        thread = threading.Thread(target=killer, args=(process,), daemon=True)
        thread.start()
    code = process.wait()
    if thread is not None:
        thread.join()
    return code


def final_weights(run_dir: Path) -> dict:
    return load_run(run_dir, torch.device("cpu")).model.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--mtbf", type=float, default=20.0, help="mean seconds between kills")
    parser.add_argument("--ckpt-failures", type=int, default=3, help="checkpoint writes that fail (disk full)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp)
        started = time.perf_counter()
        assert run(command(data, tmp / "reference", args.steps, args.checkpoint_every)) == 0, "the fault-free run failed"
        reference_s = time.perf_counter() - started
        print(f"fault-free run: {args.steps} steps in {reference_s:.0f} s", flush=True)

        saves = list(range(args.checkpoint_every, args.steps, args.checkpoint_every))
        failing = sorted(rng.sample(saves, min(args.ckpt_failures, len(saves))))
        fault = ";".join(f"ckpt_fail:step={s}:rank={rng.randrange(2)}" for s in failing)
        kills = []

        def killer(process):
            while True:
                try:
                    process.wait(timeout=rng.expovariate(1 / args.mtbf))
                    return  # the job finished
                except subprocess.TimeoutExpired:
                    pass
                pids = workers(process.pid)
                if process.poll() is None and pids:
                    victim = rng.choice(pids)
                    try:
                        os.kill(victim, signal.SIGKILL)
                        kills.append(time.perf_counter())
                        print(f"  kill -9 worker {victim} at {time.perf_counter() - soak_start:.0f} s", flush=True)
                    except ProcessLookupError:
                        pass

        print(f"soak: kills every {args.mtbf:g} s on average; checkpoint writes failing at steps {failing}", flush=True)
        soak_start = time.perf_counter()
        code = run(command(data, tmp / "soak", args.steps, args.checkpoint_every), fault, killer)
        soak_s = time.perf_counter() - soak_start
        assert code == 0, f"the soak run failed (exit {code})"

        soak = RunDir(tmp / "soak")
        summary = summarize(soak)
        failed_writes = len(list(soak.faults.glob("ckpt_fail*")))
        want, got = final_weights(tmp / "reference"), final_weights(tmp / "soak")
        equal = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        print(f"soak run: {soak_s:.0f} s wall against {reference_s:.0f} s fault-free; "
              f"restart time {summary['restart_s']:.1f} s, recomputed {summary['recomputed_s']:.1f} s, "
              f"checkpoint stalls {summary['checkpoint_stall_s']:.1f} s, other {summary['other_s']:.1f} s; "
              f"planner's goodput for this run's failure rate {summary['planner_goodput']:.3f}")
        print(f"soak: {len(kills) + failed_writes} faults injected ({len(kills)} kills, {failed_writes} checkpoint-write "
              f"failures), {summary['restarts']} restarts, {summary['recomputed_steps']} steps recomputed, "
              f"goodput {summary['goodput']:.3f}, final weights equal the fault-free run's: {'yes' if equal else 'NO'}")


if __name__ == "__main__":
    main()
