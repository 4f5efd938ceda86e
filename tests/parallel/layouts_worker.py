"""Run under torchrun by the parallel tests: train the same tiny config under several
layouts inside one process group (group set-up is the slow part on CPU), one run
directory per layout; the test compares them with one-process training.

    torchrun --nproc-per-node 4 tests/parallel/layouts_worker.py DATA OUT BASE_OVERRIDES_JSON PLAN_JSON

PLAN_JSON is a list of {"name", "overrides", "resume_from"?, "probe_logits"?};
"resume_from" names an earlier run of the plan whose directory is copied first, so the run
resumes from its checkpoint under a new layout (resharding); with "probe_logits" each rank
records the shape it holds of the model's logits for one batch (logits_rank<R>.json); an
entry {"name", "check": "ep_dispatch"} runs moe_checks.check_ep_dispatch instead of training.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from gigatrain.config import load_config
from gigatrain.train.trainer import Trainer, train
from moe_checks import check_ep_dispatch


def probe_logits(trainer: Trainer, run_dir: Path) -> None:
    inputs, _ = trainer.loader.next_batch()
    with torch.no_grad():
        logits = trainer.model(inputs)
    local = logits.to_local() if isinstance(logits, DTensor) else logits
    record = {"type": type(logits).__name__, "local_shape": list(local.shape),
              "sharded_dims": [p.dim if p.is_shard() else None for p in getattr(logits, "placements", [])]}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"logits_rank{dist.get_rank()}.json").write_text(json.dumps(record))


def main(data: str, out: str, base_json: str, plan_json: str) -> None:
    dist.init_process_group("gloo")
    base, plan = json.loads(base_json), json.loads(plan_json)
    out_dir = Path(out)
    for entry in plan:
        run_dir = out_dir / entry["name"]
        if entry.get("resume_from") and dist.get_rank() == 0:
            shutil.copytree(out_dir / entry["resume_from"], run_dir)
        dist.barrier()
        if entry.get("check") == "ep_dispatch":
            check_ep_dispatch(run_dir)
            dist.barrier()
            continue
        cfg = load_config(None, [f"--data.path={data}", f"--run.dir={run_dir}", *base, *entry["overrides"]])
        if entry.get("probe_logits"):
            probe_logits(Trainer(cfg), run_dir)
        else:
            train(cfg)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
