"""The training loop, in process: exact resume, stops, metrics and run-directory contents."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO, TINY, final_weights, step_values, write_corpus
from gigatrain.checkpoint import dcp as checkpoint
from gigatrain.config import ConfigError
from gigatrain.data.loader import TokenData, eval_batches
from gigatrain.rundir import RunDir, resolve_run_config
from gigatrain.train.schedule import lr_at
from gigatrain.train.trainer import Trainer, train


def config(run_dir, data, *extra):
    return resolve_run_config(None, [*TINY, f"--run.dir={run_dir}", f"--data.path={data}", *extra])


def step_losses(run_dir):
    return [(r["step"], r["loss"]) for r in RunDir(run_dir).metrics_records() if "loss" in r]


def test_exact_resume(tmp_path, byte_data):
    common = ["--train.max_steps=14", "--train.checkpoint_every=4", "--train.eval_every=5",
              "--train.micro_batch_size=4", "--train.schedule=wsd"]
    straight = train(config(tmp_path / "straight", byte_data, *common))
    assert straight.stopped_by == "max_steps" and straight.step == 14

    first = train(config(tmp_path / "split", byte_data, *common, "--train.stop_at_step=6"))
    assert first.stopped_by == "stop_at_step" and first.step == 6
    # The resumed run is configured by the run directory alone, as `gigatrain train --run.dir=D` is.
    resumed_cfg = resolve_run_config(None, [f"--run.dir={tmp_path / 'split'}"])
    second = train(resumed_cfg)
    assert second.stopped_by == "max_steps" and second.step == 14

    assert step_losses(tmp_path / "split") == step_losses(tmp_path / "straight")
    assert [s for s, _ in step_losses(tmp_path / "split")] == list(range(1, 15))  # each step once
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_metrics_and_run_directory(tmp_path, byte_data):
    run_dir = tmp_path / "run"
    result = train(config(run_dir, byte_data, "--train.max_steps=10", "--train.eval_every=5",
                          "--train.samples=1", "--train.sample_tokens=16"))
    records = RunDir(run_dir).metrics_records()
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    for record in steps:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s"):
            assert math.isfinite(record[key]), key
        assert 0 < record["mfu"] < 1
        assert record["tokens_per_s"] == pytest.approx(8 * 64 / record["step_time_s"])
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert evals[-1]["val_loss"] == pytest.approx(result.val_loss)
    assert steps[-1]["loss"] < steps[0]["loss"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["git_sha"] and info["versions"]["torch"] == torch.__version__
    assert json.loads((run_dir / "config.json").read_text())["train"]["max_steps"] == 10
    for name in ("config.toml", "tokenizer.json", "loss.png", "throughput.png", "samples.txt"):
        assert (run_dir / name).stat().st_size > 0, name
    assert checkpoint.latest(run_dir / "checkpoints").name == "step_00000010"


def test_keeps_last_k_checkpoints(tmp_path, byte_data):
    run_dir = tmp_path / "run"
    train(config(run_dir, byte_data, "--train.max_steps=9", "--train.checkpoint_every=2", "--train.keep_checkpoints=2"))
    names = [p.name for p in checkpoint.committed(run_dir / "checkpoints")]
    assert names == ["step_00000008", "step_00000009"]


def test_time_limit_ends_with_checkpoint_and_eval(tmp_path, byte_data):
    run_dir = tmp_path / "run"
    result = train(config(run_dir, byte_data, "--train.max_steps=100000", "--train.time_limit_s=4"))
    assert result.stopped_by == "time_limit" and 0 < result.step < 100000
    assert checkpoint.latest(run_dir / "checkpoints").name == f"step_{result.step:08d}"
    stop = RunDir(run_dir).event_records()[-1]
    if stop["cut_short_by"] is None:
        assert RunDir(run_dir).metrics_records()[-1]["val_bpb"] == pytest.approx(result.val_bpb)
    else:
        # The trainer stops early by what the checkpoint and the evaluation cost so far; on a
        # machine that stalls (seen once in CI: a 0.08 s save took 1.2 s) the final checkpoint
        # can still overrun that, and then the limit holds and the evaluation gives way.
        assert stop["cut_short_by"] == "time_limit" and result.val_bpb is None


def test_gradient_accumulation_matches_full_batch(tmp_path, byte_data):
    # fp32 on the CPU, whatever the machine: on a GPU, "auto" trains in bf16, far coarser than these tolerances.
    full = Trainer(config(tmp_path / "a", byte_data, "--train.device=cpu"))
    accumulated = Trainer(config(tmp_path / "b", byte_data, "--train.device=cpu", "--train.micro_batch_size=2"))
    inputs, targets = full.loader.next_batch()
    loss_full, norm_full, _ = full.train_step(inputs, targets, lr=1e-3)
    loss_acc, norm_acc, _ = accumulated.train_step(inputs, targets, lr=1e-3)
    assert loss_acc == pytest.approx(loss_full, rel=1e-5)
    assert norm_acc == pytest.approx(norm_full, rel=1e-4)
    for p, q in zip(full.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_layout_other_than_one_process_is_refused(tmp_path, byte_data):
    with pytest.raises(ConfigError, match=r"\(tp=2\) multiply to 2, which does not divide the world size 1"):
        Trainer(config(tmp_path / "run", byte_data, "--parallel.tp=2"))
    with pytest.raises(ConfigError, match="parallel layout .* needs 2 processes but this run has 1"):
        Trainer(config(tmp_path / "run", byte_data, "--parallel.dp_shard=1", "--parallel.tp=2"))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_changes_nothing_numerically(tmp_path, byte_data, mode):
    plain = Trainer(config(tmp_path / "a", byte_data))
    recomputed = Trainer(config(tmp_path / "b", byte_data, f"--train.activation_checkpointing={mode}"))
    inputs, targets = plain.loader.next_batch()
    assert plain.train_step(inputs, targets, lr=1e-3) == recomputed.train_step(inputs, targets, lr=1e-3)
    for (name, p), (_, q) in zip(plain.model.state_dict().items(), recomputed.model.state_dict().items()):
        assert torch.equal(p, q), name


def test_parallel_auto_takes_the_planners_layout(tmp_path, byte_data):
    trainer = Trainer(config(tmp_path / "run", byte_data, "--parallel.auto=true"))
    d = trainer.dims
    assert (d.dp_replicate, d.dp_shard, d.tp, d.pp, d.cp) == (1, 1, 1, 1, 1)


def test_compiled_training_matches_eager_and_checkpoints_plain_names(tmp_path, byte_data):
    """torch.compile (inductor's C++ backend on CPU; Triton on GPU) changes speed, not the
    numbers beyond rounding, and leaves parameter names as the plain model has them."""
    eager = train(config(tmp_path / "eager", byte_data, "--train.max_steps=3"))
    compiled = train(config(tmp_path / "compiled", byte_data, "--train.max_steps=3", "--train.compile=true"))
    for (_, a), (_, b) in zip(step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")):
        assert a == pytest.approx(b, rel=1e-4)
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-4)
    weights = final_weights(tmp_path / "compiled")  # strict load into an uncompiled model
    assert all("_orig_mod" not in name for name in weights)


def test_raising_max_steps_continues_at_the_final_rate_unless_a_new_horizon_is_set(tmp_path, byte_data):
    run_dir = tmp_path / "run"
    first = config(run_dir, byte_data, "--train.max_steps=6")
    train(first)
    train(resolve_run_config(None, [f"--run.dir={run_dir}", "--train.max_steps=9"]))
    lrs = step_values(run_dir, "lr")
    floor = first.train.lr * first.train.min_lr_ratio
    assert lrs[6] == pytest.approx(floor)
    assert [lrs[s] for s in (7, 8, 9)] == pytest.approx([floor] * 3)  # not re-stretched over 9 steps
    # train.schedule_steps is the explicit way to decay again, over a new horizon.
    redecay = resolve_run_config(None, [f"--run.dir={run_dir}", "--train.max_steps=12", "--train.schedule_steps=12"])
    train(redecay)
    lrs = step_values(run_dir, "lr")
    assert [lrs[s] for s in (10, 11, 12)] == pytest.approx([lr_at(s, redecay.train, 12) for s in (10, 11, 12)])
    assert lrs[10] > floor


@pytest.fixture(scope="module")
def large_val_data(tmp_path_factory, corpus):
    """A validation split larger than the training split: a full evaluation takes seconds."""
    from gigatrain.data.prepare import prepare

    val = write_corpus(tmp_path_factory.mktemp("large_val") / "val", n_files=40, offset=30)
    out = tmp_path_factory.mktemp("data") / "large_val"
    prepare([str(corpus)], out, val_sources=[str(val)], tokenizer="byte")
    return out


def test_time_limit_covers_the_whole_run_and_caps_an_expensive_final_evaluation(tmp_path, large_val_data):
    """The final evaluation alone takes longer than the slack; the run still ends on time,
    with an evaluation over the batches that fit, and says where the time went."""
    limit, slack = 10, 2.0  # slack: the plots, and closing the run
    run_dir = tmp_path / "run"
    cfg = config(run_dir, large_val_data, "--train.max_steps=100000", f"--train.time_limit_s={limit}",
                 "--model.d_model=128", "--train.eval_every=100000", "--train.eval_batches=100000")
    started = time.time()
    result = train(cfg)
    assert time.time() - started < limit + slack
    assert result.stopped_by == "time_limit" and result.val_loss is not None
    final_eval = RunDir(run_dir).metrics_records()[-1]
    full = sum(1 for _ in eval_batches(TokenData(large_val_data).split("val"), cfg.data.seq_len,
                                       cfg.train.batch_size, cfg.train.eval_batches))
    assert 1 <= final_eval["val_batches"] < full  # capped: the whole split did not fit
    stop = RunDir(run_dir).event_records()[-1]
    spent = stop["time_spent"]
    assert set(spent) == {"total", "startup", "training", "checkpoints", "evaluation", "samples_plots"}
    assert spent["training"] > 0 and spent["evaluation"] > 0
    assert sum(spent.values()) - spent["total"] == pytest.approx(spent["total"], abs=0.05)


# Runs the CLI and sends the trainer a real signal at a chosen point of its end: before the final
# checkpoint is committed, during the final evaluation (after the commit), or while the plots are drawn.
SIGNAL_AT = """
import os, signal, sys
from gigatrain import cli
from gigatrain.metrics import plots
from gigatrain.train.checkpointing import CheckpointManager
from gigatrain.train.validation import Validator

when, name, args = sys.argv[1], sys.argv[2], sys.argv[3:]
send = lambda: os.kill(os.getpid(), getattr(signal, name))
final_checkpoint, evaluate, plot_run = CheckpointManager.final_checkpoint, Validator.evaluate, plots.plot_run
if when == "before_commit":
    CheckpointManager.final_checkpoint = lambda self: (send(), final_checkpoint(self))
elif when == "final_eval":
    Validator.evaluate = lambda self, *args, **kwargs: (send(), evaluate(self, *args, **kwargs))[1]
else:
    plots.plot_run = lambda run_dir: (send(), plot_run(run_dir))[1]
sys.exit(cli.run(args))
"""


@pytest.mark.parametrize("when, name, code", [("before_commit", "SIGTERM", 75), ("final_eval", "SIGINT", 0),
                                               ("plots", "SIGTERM", 0)])
def test_a_signal_after_the_final_commit_cuts_the_end_short_and_exits_0(tmp_path, byte_data, when, name, code):
    run_dir = tmp_path / "run"
    args = ["train", *TINY, "--train.device=cpu", f"--data.path={byte_data}", f"--run.dir={run_dir}",
            "--train.max_steps=4", "--train.eval_every=100000", "--train.eval_batches=8"]
    result = subprocess.run([sys.executable, "-c", SIGNAL_AT, when, name, *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == code, result.stderr[-3000:]
    assert checkpoint.latest(run_dir / "checkpoints").name == "step_00000004"
    stop = RunDir(run_dir).event_records()[-1]
    evaluated = any("val_loss" in r for r in RunDir(run_dir).metrics_records())
    if when == "before_commit":  # as documented: a checkpoint, no final evaluation, exit 75
        assert stop["reason"] == name and not evaluated
    elif when == "final_eval":  # the run is finished: the evaluation is cut short and dropped, exit 0
        assert stop["reason"] == "max_steps" and stop["cut_short_by"] == name and not evaluated
        assert f"{name} cut the end short" in result.stdout
    else:  # the plots were under way: they finish, exit 0
        assert stop["reason"] == "max_steps" and evaluated and (run_dir / "loss.png").exists()
