"""Held-out evaluation during training (every train.eval_every steps), and the end of a run:
the final evaluation and samples, as much of them as the time limit leaves room for."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from gigatrain.config import Config
from gigatrain.data.loader import TokenData, eval_batches
from gigatrain.metrics.processor import MetricsProcessor
from gigatrain.parallel.mesh import ParallelDims
from gigatrain.rundir import RunDir
from gigatrain.train.evaluate import generate, sample_text
from gigatrain.train.stopping import EndCut, RunClock

# No trailing space: BPE merges a space into the next word, so "def " would end on a lone space.
DEFAULT_CORPUS_PROMPTS = ["def", "class", "import"]
IGNORE = -100  # cross_entropy's ignore_index: padding targets that count for nothing
# Under train.time_limit_s, the final evaluation and samples get at most this share of the
# budget (the evaluation first): an expensive evaluation must not eat the training.
END_SHARE = 0.1


@dataclass
class EndCosts:
    """Seconds the work after the last step takes, as measured by this process; a time limit
    leaves room for them."""
    eval_batch_s: float = 0.0  # one global evaluation batch
    sample_s: float = 0.0  # one sample of train.sample_tokens tokens


def pad_batch(inputs: torch.Tensor, targets: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill a short last evaluation batch up to `rows` with targets that count for nothing,
    so every rank of every layout runs the same shapes."""
    missing = rows - inputs.shape[0]
    if missing <= 0:
        return inputs, targets
    return (torch.cat([inputs, inputs[:1].expand(missing, -1)]),
            torch.cat([targets, torch.full((missing, targets.shape[1]), IGNORE, dtype=targets.dtype)]))


def end_plan(costs: EndCosts, eval_batches: int, samples: int, time_limit_s: float) -> tuple[int, int]:
    """How many evaluation batches and samples the end of a run has room for: all of them
    without a time limit; under one, what fits in END_SHARE of it, the evaluation first."""
    if not time_limit_s:
        return eval_batches, samples
    share = END_SHARE * time_limit_s
    batches = min(eval_batches, max(1, int(share / max(costs.eval_batch_s, 1e-9))))
    left = max(0.0, share - batches * costs.eval_batch_s)  # the one batch may overrun the share
    return batches, min(samples, int(left / costs.sample_s) if costs.sample_s else samples)


class Validator:
    """Evaluates the val split under the training layout (every rank takes part) and writes
    samples (one process only: sampling runs the whole model)."""

    def __init__(self, cfg: Config, data: TokenData, parallel, *, dims: ParallelDims,
                 device: torch.device, dtype: torch.dtype | None, clock: RunClock, run_dir: RunDir):
        self.cfg, self.data, self.parallel, self.dims = cfg, data, parallel, dims
        self.device, self.dtype, self.clock, self.run_dir = device, dtype, clock, run_dir
        self.costs = EndCosts()
        self.batches_done = 0  # by the last evaluation

    def due(self, step: int) -> bool:
        """Whether `step` ends with an evaluation (the last step's is the final one, after the checkpoint)."""
        t = self.cfg.train
        return step % t.eval_every == 0 and step < t.max_steps

    def validate(self, step: int, metrics: MetricsProcessor) -> tuple[float, float]:
        """The evaluation of a step that is due for one, recorded and shown."""
        val = self.evaluate()
        metrics.log_eval(step, *val)
        return val

    def evaluate(self, max_batches: int | None = None, cut=None) -> tuple[float, float]:
        """Mean loss over the first max_batches (default train.eval_batches) global batches of
        the val split (the same windows under every layout), and bits per byte. `cut`, asked
        before each batch after the first with the batch's cost (every rank must answer the
        same), may end it early; then the result stands for the batches done."""
        split = self.data.split("val")
        batch, local = self.dims.global_batch, self.dims.local_batch
        mine = slice(self.parallel.dp_rank * local, (self.parallel.dp_rank + 1) * local)
        loss_sum, count, done = torch.zeros((), device=self.device), 0, 0
        started = time.perf_counter()
        self.parallel.train(False)
        for inputs, targets in eval_batches(split, self.cfg.data.seq_len, batch, max_batches or self.cfg.train.eval_batches):
            if done and cut is not None and cut(self.costs.eval_batch_s):
                break
            inputs, targets = pad_batch(inputs, targets, batch)
            loss_sum += self.parallel.loss_sum(inputs[mine], targets[mine]).float()
            count += int((targets != IGNORE).sum())
            done += 1
        self.parallel.train(True)
        loss = self.parallel.reduce_sum(loss_sum).item() / max(1, count)
        elapsed = time.perf_counter() - started  # after .item(): a GPU has finished the batches too
        self.costs.eval_batch_s = elapsed / max(1, done)
        self.clock.spent["evaluation"] += elapsed
        self.batches_done = done
        # The evaluated windows are a sample of the split: convert with the split's bytes per token.
        return loss, loss / (math.log(2) * split.bytes_per_token)

    # -- samples ----------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        """Samples at the end of the run: sampling runs the whole model in one process, so a
        multi-process run leaves them to `gigatrain generate RUN` after training."""
        return self.cfg.train.samples if self.dims.world_size == 1 else 0

    def sampling(self) -> dict:
        return dict(temperature=0.8, top_k=50, context_len=self.cfg.data.seq_len, device=self.device, dtype=self.dtype)

    def write_samples(self, step: int, count: int, cut=None) -> None:
        """Up to `count` samples into samples.txt; `cut`, asked before each with its cost, may end them early."""
        if not count or self.dims.world_size > 1:
            return
        prompts = DEFAULT_CORPUS_PROMPTS if not self.cfg.data.path else [""]
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        lines = []
        with self.clock.timed("samples_plots"):
            for i in range(count):
                if cut is not None and cut(self.costs.sample_s):
                    break
                started = time.perf_counter()
                prompt = prompts[i % len(prompts)]
                text = sample_text(self.parallel.parts[0], self.data.tokenizer, prompt, self.cfg.train.sample_tokens,
                                   generator=generator, **self.sampling())
                lines.append(f"--- sample {i + 1} (step {step}, prompt {prompt!r}) ---\n{text}\n")
                self.costs.sample_s = time.perf_counter() - started
        if lines:
            self.run_dir.samples.write_text("\n".join(lines))

    # -- the end of the run under a time limit -----------------------------------------------------
    def measure_end_costs(self) -> None:
        """Time one evaluation batch and one sampled token, what the end of the run is planned from."""
        self.evaluate(max_batches=1)
        if self.dims.world_size == 1 and self.cfg.train.samples:
            with self.clock.timed("samples_plots"):
                started = time.perf_counter()
                generate(self.parallel.parts[0], [self.data.tokenizer.eot_id] * self.cfg.data.seq_len, 1,
                         **self.sampling())
                self.costs.sample_s = (time.perf_counter() - started) * self.cfg.train.sample_tokens

    def end_plan(self) -> tuple[int, int]:
        t = self.cfg.train
        return end_plan(self.costs, t.eval_batches, self.samples, t.time_limit_s)

    def end_cost_s(self) -> float:
        """Seconds the final evaluation and samples are planned to take."""
        batches, samples = self.end_plan()
        return batches * self.costs.eval_batch_s + samples * self.costs.sample_s

    def cost_at_s(self, step: int) -> float:
        """Seconds the evaluation after `step` takes, if one is due."""
        return self.cfg.train.eval_batches * self.costs.eval_batch_s if self.due(step) else 0.0

    def finish(self, step: int, cut: EndCut, metrics: MetricsProcessor) -> tuple[float | None, float | None]:
        """The optional work of a finished run: the final evaluation and samples, as much as the
        time limit leaves room for. A signal now cuts it short and drops a partial evaluation."""
        batches, samples = self.end_plan()
        val = (None, None)
        if not cut(self.costs.eval_batch_s):
            val = self.evaluate(batches, cut)
            if cut.by in (None, "time_limit"):  # a partial evaluation stands for its first batches
                metrics.log_final_eval(step, *val, batches=self.batches_done)
            else:
                val = (None, None)
        self.write_samples(step, samples, cut)
        return val
