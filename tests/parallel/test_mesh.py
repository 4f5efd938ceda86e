"""Layouts are checked from the config and the world size alone, before any process group
or memory exists; each broken constraint is one line that says what would fix it."""

import copy
import re

import pytest

from gigatrain.config import ConfigError, load_config, resolve_model_args
from gigatrain.parallel.context import rank_positions
from gigatrain.parallel.mesh import parallel_dims
from gigatrain.parallel.pipeline import stage_indices
from gigatrain.plan.costs import Layout
from gigatrain.plan.layout import auto_layout
from helpers import TINY, run_cli

SHAPE = ["--model.n_layers=8", "--model.n_heads=8", "--model.n_kv_heads=4", "--model.tie_embeddings=false"]


def dims(*overrides: str, world: int = 8):
    cfg = load_config(None, [*TINY, *SHAPE, *overrides])
    return parallel_dims(cfg, resolve_model_args(cfg), n_processes=world)


def test_dp_shard_is_inferred_and_the_config_keeps_minus_one():
    cfg = load_config(None, [*TINY, *SHAPE, "--parallel.tp=2"])
    d = parallel_dims(cfg, resolve_model_args(cfg), n_processes=8)
    assert (d.pp, d.dp_replicate, d.dp_shard, d.cp, d.tp) == (1, 1, 4, 1, 2)
    assert d.dp == 4 and d.fsdp
    assert cfg.parallel.dp_shard == -1  # so the run resumes under another number of processes


def test_all_five_axes_at_once():
    d = dims("--parallel.pp=2", "--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--parallel.cp=2",
             "--parallel.tp=2", "--train.batch_size=8", world=32)
    assert d.world_size == 32 and d.dp == 4 and d.microbatches == 2


@pytest.mark.parametrize("overrides, world, message", [
    (["--parallel.dp_shard=1", "--parallel.tp=2"], 4, "needs 2 processes but this run has 4"),
    (["--parallel.tp=3"], 6, "parallel.tp=3 does not divide model.n_heads=8"),
    (["--parallel.tp=8"], 8, "parallel.tp=8 does not divide model.n_kv_heads=4"),
    (["--parallel.cp=2", "--data.seq_len=34"], 2, "not divisible by 2*parallel.cp=4"),
    (["--parallel.pp=3"], 3, "model.n_layers=8 cannot be split into 3 equal pipeline stages"),
    (["--parallel.pp=2", "--parallel.pp_schedule=Interleaved1F1B", "--model.n_layers=6"], 2,
     "model.n_layers=6 cannot be split into 4 equal pipeline stages"),
    (["--train.batch_size=6"], 4, "train.batch_size=6 is not divisible by the data-parallel degree"),
    (["--train.micro_batch_size=4"], 4, "train.micro_batch_size=4 does not divide the per-rank batch batch_size/dp=2"),
    (["--parallel.pp=2", "--parallel.pp_microbatches=3"], 2, "parallel.pp_microbatches=3 does not divide"),
    (["--parallel.pp=2", "--parallel.pp_stages_per_rank=2"], 2, "needs a multi-stage schedule"),
    (["--parallel.tp=3", "--parallel.dp_shard=1", "--parallel.cp=-1"], 8, "(tp=3) multiply to 3, which does not divide the world size 8"),
])
def test_impossible_layouts_are_named(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        dims(*overrides, world=world)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [["--parallel.tp=2"], ["--parallel.pp=2"], ["--parallel.pp=2", "--parallel.tp=2"]])
def test_tied_embeddings_take_tensor_and_pipeline_parallelism(overrides):
    d = dims(*overrides, "--model.tie_embeddings=true", world=4)
    assert d.world_size == 4


def test_bad_layout_stops_before_start_up_with_exit_2():
    """Checked against torchrun's WORLD_SIZE before joining the process group: no rendezvous,
    no memory, one line."""
    result = run_cli("train", *TINY, "--parallel.tp=3", env={"WORLD_SIZE": "4", "RANK": "0"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "(tp=3) multiply to 3, which does not divide the world size 4" in result.stderr


def test_context_parallel_chunks_cover_the_sequence_with_equal_causal_work():
    seq, cp = 32, 4
    held = [rank_positions(seq, cp, r) for r in range(cp)]
    assert sorted(int(p) for h in held for p in h) == list(range(seq))
    # Causal work of a query at position p is p + 1 keys: head-tail pairing evens it out.
    assert len({int((h + 1).sum()) for h in held}) == 1


def test_looped_schedules_place_stages_round_robin():
    d = dims("--parallel.pp=4", "--parallel.pp_schedule=Interleaved1F1B", "--parallel.dp_shard=1", world=4)
    assert [stage_indices(d, r) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("overrides, world, sizes", [
    (["--train.batch_size=16", "--train.micro_batch_size=4"], 32, [128, 256]),  # the 1B GPU config on 4 x 8 GPUs
    (["--train.batch_size=200", "--train.micro_batch_size=4"], 32, [128, 256, 384]),
    (["--train.batch_size=6", "--parallel.pp=2", "--parallel.pp_microbatches=4"], 4, [8, 16]),  # dp 2 x 4 microbatches
    (["--train.batch_tokens=320", "--data.seq_len=64"], 4, [256, 512, 768]),  # named in tokens, as given
])
def test_a_batch_that_does_not_split_names_batch_sizes_that_do(overrides, world, sizes):
    with pytest.raises(ConfigError) as caught:
        dims(*overrides, world=world)
    named = [int(n) for n in re.search(r"can be ([\d, or]+)$", str(caught.value)).group(1).replace(" or ", ", ").split(", ")]
    assert named == sizes
    key = "--train.batch_tokens" if "tokens" in str(caught.value).rsplit(";", 1)[1] else "--train.batch_size"
    for size in named:  # each suggestion passes the same check
        dims(*overrides, f"{key}={size}", world=world)


def test_the_resolved_layout_carries_the_batch_split_and_leaves_the_config_as_written():
    cfg = load_config(None, [*TINY, *SHAPE, "--parallel.tp=2", "--train.batch_tokens=1024", "--train.micro_batch_size=2",
                             "--train.activation_checkpointing=selective"])
    written = copy.deepcopy(cfg)
    d = parallel_dims(cfg, resolve_model_args(cfg), n_processes=8)
    assert cfg == written  # neither validation nor resolution rewrites a field
    assert (d.global_batch, d.local_batch, d.micro_batch_size, d.microbatches) == (16, 4, 2, 2)
    assert d.activation_checkpointing == "selective"
    assert d.to_dict() == {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "cp": 1, "tp": 2, "ep": 1, "pp_schedule": "1F1B",
                           "pp_stages_per_rank": 1, "micro_batch_size": 2, "microbatches": 2, "local_batch": 4,
                           "global_batch": 16, "activation_checkpointing": "selective"}


def test_parallel_auto_resolves_to_the_planners_whole_layout():
    """Degrees, schedule, micro-batch and checkpointing: the run is the one the planner costed."""
    cfg = load_config(None, [*TINY, *SHAPE, "--parallel.auto=true", "--train.batch_size=32"])
    written = copy.deepcopy(cfg)
    d = parallel_dims(cfg, resolve_model_args(cfg), n_processes=8)
    chosen = auto_layout(resolve_model_args(cfg), 8, 64, 32, "cpu")
    assert cfg == written
    assert d.degrees() == chosen.degrees() and d.micro_batch_size == chosen.micro_batch_size
    assert d.activation_checkpointing == chosen.activation_checkpointing
    assert d.pp_schedule == chosen.pp_schedule or d.pp == 1


def test_parallel_auto_gives_a_mixture_of_experts_the_planners_expert_parallelism():
    cfg = load_config(None, ["--model.preset=tiny-moe", "--data.seq_len=64", "--parallel.auto=true", "--train.batch_size=32"])
    args = resolve_model_args(cfg)
    d = parallel_dims(cfg, args, n_processes=4)
    chosen = auto_layout(args, 4, 64, 32, "cpu")
    assert d.ep == chosen.ep and d.degrees() == chosen.degrees()
    assert args.n_experts % d.ep == 0 and (d.dp_shard * d.cp) % d.ep == 0


def test_parallel_auto_trains_with_the_planners_micro_batch_and_checkpointing(tmp_path, byte_data, monkeypatch):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from gigatrain.plan import layout as plan_layout
    from gigatrain.rundir import RunDir, resolve_run_config
    from gigatrain.train.trainer import Trainer

    # One process leaves the real planner nothing to choose; this one picks as it would on a fleet.
    monkeypatch.setattr(plan_layout, "auto_layout",
                        lambda *args, **kwargs: Layout(micro_batch_size=2, activation_checkpointing="selective"))
    cfg = resolve_run_config(None, [*TINY, f"--run.dir={tmp_path / 'run'}", f"--data.path={byte_data}",
                                    "--parallel.auto=true", "--train.max_steps=2", "--train.samples=0"])
    trainer = Trainer(cfg)
    assert (trainer.dims.micro_batch_size, trainer.dims.microbatches, trainer.dims.activation_checkpointing) == (2, 4, "selective")
    assert all(isinstance(block, CheckpointWrapper) for block in trainer.model.layers.values())
    result = trainer.run()
    trainer.close()
    assert result.step == 2
    recorded = RunDir(tmp_path / "run").read_run_info()["layout"]
    assert (recorded["micro_batch_size"], recorded["activation_checkpointing"]) == (2, "selective")
