"""`gigatrain export` of a random-weights checkpoint: seconds and peak host memory.

For each preset, a run directory around a checkpoint of random weights (model only, as export
reads it) is written, then `gigatrain export` runs in a subprocess of its own, so its peak
resident memory (VmHWM of the child) is the export's alone. Export streams one tensor at a
time, so the peak should stay near the interpreter's baseline (torch imported) plus about two
copies of the largest tensor (the embeddings), however deep the model.

    python bench/export.py [--preset gpt2-124m llama3-1b] [--n-layers N] [--dir DIR]

--n-layers shrinks the presets' depth (the largest tensor, the embeddings, keeps its size).
Prints one line per preset: parameters, bytes written, seconds, peak RSS, baseline RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gigatrain.checkpoint.dcp import Checkpointer
from gigatrain.config import load_config, to_dict
from gigatrain.data.tokenizers import make_tokenizer
from gigatrain.models.presets import get_preset
from gigatrain.models.transformer import Transformer
from gigatrain.rundir import RunDir

# Each child prints its own peak RSS (KiB) last: the baseline imports what export imports.
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork and exec, so a child would report
# this process's peak (the model it just built) as its own.
PEAK = "import sys; print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])"
BASELINE = "import torch, gigatrain.cli, gigatrain.interop.export; " + PEAK
EXPORT = "import sys; from gigatrain.cli import run; code = run(sys.argv[1:]); " + PEAK + "; sys.exit(code)"


def random_run(run_dir: Path, preset: str, n_layers: int | None):
    """A run directory whose one checkpoint holds random weights of `preset` (fp32, CPU)."""
    args = get_preset(preset)
    if n_layers:
        args = dataclasses.replace(args, n_layers=n_layers)
    cfg = load_config(None, [f"--model.preset={preset}", f"--run.dir={run_dir}"])
    rundir = RunDir(run_dir)
    rundir.path.mkdir(parents=True)
    rundir.write_config(to_dict(cfg), "")
    rundir.write_run_info({"device": "cpu", "model_args": dataclasses.asdict(args)})
    make_tokenizer("byte").save(run_dir)  # export copies it; the bench measures the weights
    model = Transformer(args, seed=0)
    checkpointer = Checkpointer(rundir.checkpoints, keep=1, async_save=False)
    checkpointer.save(1, [model], None, {"step": 1})
    checkpointer.close()
    return args, sum(p.numel() for p in model.parameters())


def child(code: str, *args: str) -> tuple[float, int]:
    """Seconds and peak RSS (KiB) of a Python child process running `code`."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - started, int(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["gpt2-124m", "llama3-1b"])
    parser.add_argument("--n-layers", type=int, default=None, help="shrink each preset to N layers")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    options = parser.parse_args()
    root = Path(options.dir or tempfile.mkdtemp(prefix="gigatrain-bench-export-"))
    _, baseline_kb = child(BASELINE)
    try:
        for preset in options.preset:
            run_dir, out = root / f"run-{preset}", root / f"hf-{preset}"
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            args, n_params = random_run(run_dir, preset, options.n_layers)
            seconds, peak_kb = child(EXPORT, "export", str(run_dir), "--out", str(out))
            written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            largest = max(args.vocab_size * args.d_model, args.ffn_hidden * args.d_model) * 4
            print(f"{preset} ({args.n_layers} layers, {n_params / 1e6:.0f}M params): wrote {written / 1e9:.2f} GB "
                  f"in {seconds:.1f} s ({written / 1e6 / seconds:.0f} MB/s); peak RSS {peak_kb / 1024:.0f} MiB "
                  f"(baseline after imports {baseline_kb / 1024:.0f} MiB; largest tensor {largest / 2**20:.0f} MiB)",
                  flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if options.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
