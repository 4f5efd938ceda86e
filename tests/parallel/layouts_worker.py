"""Run under torchrun by the parallel tests (helpers.run_layouts_job): train tiny configs under
many layouts inside one process group (start-up, imports and group set-up are the slow part on
CPU), one run directory per entry; the tests compare them with one-process training.

    torchrun --nproc-per-node 4 tests/parallel/layouts_worker.py DATA OUT PLAN_JSON

PLAN_JSON is a list of {"name", "overrides", "resume_from"?, "probe_logits"?} or {"name", "check"};
"overrides" are the whole run's (on top of --data.path and --run.dir=OUT/name); "resume_from"
names an earlier run of the plan whose directory is copied first, so the run resumes from its
checkpoint under a new layout (resharding); with "probe_logits" each rank records the shape it
holds of the model's logits for one batch and the difference between the layout's loss of them
and the whole logits' (logits_rank<R>.json); "check" runs one of
layout_checks.CHECKS instead of training.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from gigatrain.config import load_config
from gigatrain.models import loss
from gigatrain.parallel.tensor import loss_context, parallel_loss
from gigatrain.train.trainer import Trainer, train
from layout_checks import CHECKS


def probe_logits(trainer: Trainer, run_dir: Path) -> None:
    inputs, targets = trainer.loader.next_batch()
    with torch.no_grad():
        logits = trainer.model(inputs)
        # The layouts' loss of these logits, with the chunks' threshold lowered below their size:
        # sharded logits must still go to torch's loss parallel, and give the whole logits' loss.
        threshold, loss.CHUNKED_MIN_LOGITS = loss.CHUNKED_MIN_LOGITS, 1
        try:
            with loss_context(trainer.dims.tp):
                sharded_loss = parallel_loss(logits, targets)
        finally:
            loss.CHUNKED_MIN_LOGITS = threshold
        whole = logits.full_tensor() if isinstance(logits, DTensor) else logits
        whole_loss = loss.cross_entropy(whole, targets)
    local = logits.to_local() if isinstance(logits, DTensor) else logits
    record = {"type": type(logits).__name__, "local_shape": list(local.shape),
              "sharded_dims": [p.dim if p.is_shard() else None for p in getattr(logits, "placements", [])],
              "loss_difference": abs(sharded_loss.full_tensor().item() - whole_loss.item())}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"logits_rank{dist.get_rank()}.json").write_text(json.dumps(record))


def main(data: str, out: str, plan_json: str) -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:  # the rank that draws a run's plots
        # No plots: the checks read metrics and checkpoints only (tests/metrics/test_report.py tests
        # the plots), and rank 0 drawing them after every entry kept the other three waiting.
        from gigatrain.metrics import plots

        plots.plot_run = lambda run_dir: []
    out_dir = Path(out)
    for entry in json.loads(plan_json):
        run_dir = out_dir / entry["name"]
        if entry.get("resume_from") and dist.get_rank() == 0:
            shutil.copytree(out_dir / entry["resume_from"], run_dir)
        dist.barrier()
        if "check" in entry:
            CHECKS[entry["check"]](run_dir)
        else:
            cfg = load_config(None, [f"--data.path={data}", f"--run.dir={run_dir}", *entry["overrides"]])
            if entry.get("probe_logits"):
                probe_logits(Trainer(cfg), run_dir)
            else:
                train(cfg)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
