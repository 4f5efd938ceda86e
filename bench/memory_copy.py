"""What an in-memory copy (fault.recovery=memory) costs training: one process trains a preset
with a copy every `--every` steps, and the run's `memory_checkpoint` events give each copy's
stall (the time training waited: the device-to-host copy into a reused, pinned buffer), its
bytes, and its write to host memory in the background; the steps' own times are the yardstick.

    python bench/memory_copy.py [--preset tiny] [--device cpu|cuda] [--steps 14] [--every 2]
                                [--override=--section.key=value ...]

The copies are written into a folder on /dev/shm (a tmpfs, as fault.memory_dir's default). A copy
waits for the previous one's write to end, so with copies closer together than a write takes
the stall is the write's; `--every` far enough apart measures the copy alone. The first copy of a
process allocates its host buffer (pinned on a GPU), so it is reported apart from the others.
The last line reads
`copy stall median X ms for Y MB (Z GB/s), N% of a step's T ms`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from soak import make_data  # noqa: E402
from startup import read_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--every", type=int, default=2, help="fault.memory_every")
    parser.add_argument("--override", action="append", default=[], metavar="--SECTION.KEY=VALUE")
    args = parser.parse_args()
    # The copies go where they would in a real run: a tmpfs (the default fault.memory_dir is on
    # /dev/shm); a folder on disk would measure the disk.
    shm = Path(tempfile.mkdtemp(prefix="gigatrain-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, run_dir = make_data(tmp), tmp / "run"
        try:
            subprocess.run([sys.executable, "-m", "gigatrain", "train", f"--model.preset={args.preset}",
                            f"--train.device={args.device}", f"--train.max_steps={args.steps}", "--train.eval_every=1000000",
                            "--train.checkpoint_every=1000000", "--train.samples=0", "--train.progress=plain",
                            "--fault.recovery=memory", f"--fault.memory_every={args.every}",
                            f"--fault.memory_dir={shm}", f"--data.path={data}", f"--run.dir={run_dir}",
                            *args.override], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        finally:
            shutil.rmtree(shm, ignore_errors=True)
        copies = [e for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") == "memory_checkpoint"]
        steps = [r["step_time_s"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r][1:]
    if len(copies) < 2:
        raise SystemExit(f"{len(copies)} copies recorded; raise --steps or lower --every")
    first, rest = copies[0], copies[1:]
    stall = statistics.median(e["stall_s"] for e in rest)
    write = statistics.median(e["write_s"] for e in rest)
    step = statistics.median(steps)
    mb = first["bytes"] / 1e6
    stalls = ", ".join(f"{1e3 * e['stall_s']:.1f}" for e in rest)
    print(f"{args.preset} on {args.device}: {len(copies)} copies of {mb:,.1f} MB; the first (allocating its buffer) "
          f"stalled {1e3 * first['stall_s']:.1f} ms; the rest: stall {stalls} ms, "
          f"background write median {1e3 * write:.1f} ms")
    print(f"copy stall median {1e3 * stall:.1f} ms for {mb:,.1f} MB ({mb / 1e3 / stall:.1f} GB/s), "
          f"{100 * stall / step:.1f}% of a step's {1e3 * step:.0f} ms")


if __name__ == "__main__":
    main()
