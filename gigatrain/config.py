"""Typed configuration: dataclasses, loaded from TOML and ``--section.key=value`` overrides.

Every key has a type and, where it matters, a set of choices or a valid range;
anything else stops at start-up with a ``ConfigError`` whose one-line message
names the key and what would be valid. Nothing is ever ``eval``-ed.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gigatrain.models.presets import PRESETS, get_preset, with_overrides
from gigatrain.models.transformer import ModelArgs


class ConfigError(ValueError):
    """A bad config key or value; the message is one line meant for the user."""


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = ""  # empty: runs/<name>


@dataclass
class ModelConfig:
    preset: str = "cpu-small"
    # Shape overrides; None keeps the preset's value.
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    tie_embeddings: bool | None = None
    vocab_size: int | None = None  # None: the tokenizer's (an imported model may have more rows than its tokenizer ids)
    max_seq_len: int | None = None  # sizes the rotary tables; training's data.seq_len raises it when longer
    rope_theta: float | None = None
    norm_eps: float | None = None
    # Llama 3.1's rotary scaling (models/transformer.py); rope_scaling_factor 1: none
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_seq_len: int | None = None
    mlp_activation: str | None = None  # silu | gelu | relu2 (squared ReLU, not gated)
    attn_softcap: float | None = None
    qk_norm: bool | None = None
    logit_softcap: float | None = None  # output logits capped at +-c; 0: none
    zero_init_residual: bool | None = None  # attention.wo and the MLPs' w2 start at zero
    head_dim_override: int | None = None  # features per head; 0: d_model // n_heads
    # Mixture of experts (models/moe.py); n_experts 0 or 1: dense
    n_experts: int | None = None
    top_k: int | None = None
    expert_hidden: int | None = None
    n_shared_experts: int | None = None
    n_dense_layers: int | None = None
    moe_every: int | None = None
    router_score: str | None = None  # softmax | sigmoid
    route_norm: bool | None = None
    aux_loss_coef: float | None = None
    bias_update_rate: float | None = None


# The ModelArgs fields a config may override (every one: an imported model's shape is a preset plus these).
MODEL_OVERRIDES = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "preset")


@dataclass
class DataConfig:
    path: str = ""  # a prepared data folder; empty: the embedded default corpus
    tokenizer: str = "bpe"  # default corpus only: byte | bpe | path to a tokenizer.json
    vocab_size: int = 4096  # default corpus with a BPE tokenizer
    seq_len: int = 256
    verify: bool = True  # check shard checksums when opening the data
    allow_change: bool = False  # resume on other data than the checkpoint's, once (not saved with the run)


@dataclass
class TrainConfig:
    seed: int = 1337
    max_steps: int = 600
    batch_size: int = 16  # global: sequences per optimizer step, whatever the layout
    batch_tokens: int = 0  # global batch in tokens instead (batch_tokens / seq_len sequences, see global_batch_size); 0: unused
    micro_batch_size: int = 0  # sequences per forward/backward; 0: the whole batch at once (the planner's under parallel.auto)
    lr: float = 3e-3
    # adamw: AdamW for every parameter, at train.lr but for embeddings (embed_lr) and an untied
    # head (head_lr). muon: Muon for the blocks' matrices at muon_lr, AdamW for the rest as under
    # adamw; every group follows train.schedule. docs/training.md.
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02  # Muon's rate, per matrix times train.muon_scale's factor
    muon_momentum: float = 0.95  # Nesterov momentum of Muon's gradient average
    muon_scale: Literal["original", "match_rms_adamw"] = "original"  # original: sqrt(max(1, out/in)); match_rms_adamw: 0.2*sqrt(max(out, in))
    embed_lr: float = 0.0  # AdamW rate of the token embeddings (and of a tied head), under either optimizer; 0: train.lr
    head_lr: float = 0.0  # AdamW rate of an untied output head, under either optimizer; 0: train.lr
    min_lr_ratio: float = 0.1
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    schedule_steps: int = 0  # the schedule's horizon; 0: max_steps when the run starts, kept when it is raised later
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 200
    eval_batches: int = 16
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    async_checkpoint: bool = True  # write checkpoints in the background; training stalls only to copy the state
    time_limit_s: float = 0.0  # 0: no wall-clock budget
    stop_at_step: int = 0  # 0: run to max_steps
    compile: bool = False
    # float8 matmuls for the linear layers (torchao, the `gpu` extra; a GPU of compute capability 8.9+)
    float8: bool = False
    float8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"  # scales per tensor (faster) or per row (more accurate)
    # selective: op-level (save matmul and attention outputs, recompute the cheap ops), as the planner models it
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    samples: int = 3  # generated at the end of training
    sample_tokens: int = 200
    progress: Literal["auto", "bar", "plain", "off"] = "auto"


@dataclass
class ParallelConfig:
    """Degrees of the five axes; their product is the number of processes. One may be -1
    (inferred); dp_shard is, by default, so `torchrun --nproc-per-node N` is FSDP over N."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    # ZBVZeroBubble is left out: PyTorch 2.13 cannot run it forward-only, for evaluation.
    pp_schedule: Literal["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble"] = "1F1B"
    pp_microbatches: int = 0  # per step and data-parallel rank; 0: one per pipeline stage
    pp_stages_per_rank: int = 0  # 0: 2 for the looped schedules (interleaved, zero-bubble), else 1
    # Expert parallelism: each MoE layer's routed experts split over ep ranks, carved out of
    # dp_shard*cp (docs/moe.md); not a degree: it adds no processes.
    ep: int = 1
    auto: bool = False  # take the planner's best layout for the world size


# A preset's recommended train settings, measured with it: they replace the defaults above for
# that preset, and a config file or --section.key=value still overrides each (a resumed run keeps
# its saved config.json). Only gigatrain's own default preset has one, tuned as a whole for
# held-out bits per byte after 60 s on 2 CPU cores (docs/training.md, "The default recipe").
# The rates are tuned at width 96 and untied, so they are not carried to other presets: the
# published ones train with the plain defaults (AdamW at train.lr for every group) until a
# measurement says otherwise.
PRESET_RECIPES: dict[str, dict[str, object]] = {
    "cpu-small": {"train.optimizer": "muon", "train.embed_lr": 0.2, "train.head_lr": 0.012},
}

# The layout vocabulary the trainer, the config and the planner share.
DEGREES = ("dp_replicate", "dp_shard", "tp", "pp", "cp")
PP_SCHEDULES = typing.get_args(typing.get_type_hints(ParallelConfig)["pp_schedule"])
# Schedules that run several stages per rank (parallel.pp_stages_per_rank >= 2).
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")
ACTIVATION_CHECKPOINTING = typing.get_args(typing.get_type_hints(TrainConfig)["activation_checkpointing"])


@dataclass
class FaultConfig:
    """Surviving failures: docs/fault-tolerance.md. Faults to rehearse come from GIGATRAIN_FAULT."""

    watchdog_s: float = 600.0  # no step, evaluation or checkpoint for this long: dump stacks, exit 3; 0: off
    startup_timeout_s: float = 600.0  # bound on each phase of joining the process group: dump stacks, exit 3; 0: off
    loss_spike_factor: float = 3.0  # skip an update whose loss exceeds this times the recent mean; 0: off
    spike_window: int = 20  # good steps in the recent mean (the spike check starts once it is full)
    rollback_after: int = 3  # consecutive skipped updates that roll back to the last checkpoint
    max_rollbacks: int = 3  # rollbacks after which the run stops as diverged (exit 4)
    # How an interruption is survived (docs/fault-tolerance.md): `storage` restarts every process
    # from the last checkpoint on storage; `memory` from copies each rank keeps in host memory
    # (and on a peer host); `replica` keeps the other data-parallel replica groups training
    # while a failed one restarts and rejoins (torchft).
    recovery: Literal["storage", "memory", "replica"] = "storage"
    # fault.recovery=memory: every rank's state is copied into host memory every memory_every
    # steps (under memory_dir, a folder per run and per host) and to the same local rank of the
    # next host; ranks_per_host consecutive ranks share a host (0: torchrun's LOCAL_WORLD_SIZE).
    memory_every: int = 5
    memory_dir: str = "/dev/shm/gigatrain"
    ranks_per_host: int = 0
    # Under torchrun with --max-restarts, each worker's first start forks a warm spare that has
    # imported torch and gigatrain; a restarted worker trains in a fork of it, seconds sooner
    # (docs/fault-tolerance.md, "Warm spares").
    warm_spare: bool = True
    # fault.recovery=replica (docs/fault-tolerance.md, "Replica groups"): this torchrun job is
    # replica group replica_id of replica_groups, which train the same model on their own
    # shares of the data and average gradients through torchft; it records into
    # RUN_DIR/replica<replica_id>/.
    replica_groups: int = 2
    replica_id: int = -1  # -1: from the environment's REPLICA_GROUP_ID
    min_replicas: int = 1  # replica groups a step needs to commit its update
    lighthouse: str = ""  # the torchft Lighthouse, e.g. http://host:29510; "": the environment's TORCHFT_LIGHTHOUSE


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    @property
    def run_dir(self) -> Path:
        """This process's run directory: a replica group's own folder under run.dir in replica mode."""
        base = Path(self.run.dir or f"runs/{self.run.name}")
        # (-1: no group yet, as a launcher reading the config for every group sees it: the run's own folder.)
        return base / f"replica{self.fault.replica_id}" if self.fault.recovery == "replica" and self.fault.replica_id >= 0 else base


def _sections(cfg: Config) -> dict[str, object]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _field_types(section: object) -> dict[str, object]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _describe(tp: object) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return _describe(args[0])
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def describe_keys() -> dict[str, list[tuple[str, str, object]]]:
    """Every key by section, as (key, what it takes, default): read from the dataclasses, so
    `gigatrain train --help` lists exactly what `load_config` accepts. The defaults are a plain
    run's: the default preset's recipe included."""
    return {name: [(key, _describe(tp), getattr(section, key)) for key, tp in _field_types(section).items()]
            for name, section in _sections(load_config()).items()}


def _coerce(key: str, value: object, tp: object, from_text: bool) -> object:
    """Convert a TOML value or a command-line string to the field's type, or fail naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_text and str(value).lower() in ("none", "null")):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(key, value, inner, from_text)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")
        return value
    bad = ConfigError(f"{key}={value!r} is not valid; expected {_describe(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return str(value).lower() in ("true", "1", "yes", "on")
        raise bad
    if tp in (int, float):
        if isinstance(value, bool):  # an int to Python, never a number in a config
            raise bad
        if isinstance(value, int) or (tp is float and isinstance(value, float)):  # an int is a valid float
            return tp(value)
        if from_text:
            try:
                return tp(str(value).replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if from_text:
            return str(value)
        raise bad
    raise bad


def _set(cfg: Config, dotted: str, value: object, from_text: bool) -> None:
    sections = _sections(cfg)
    section_name, _, key = dotted.partition(".")
    if section_name not in sections or not key:
        raise ConfigError(f"unknown config key {dotted!r}; keys look like SECTION.KEY with SECTION one of: {', '.join(sections)}")
    section = sections[section_name]
    types_by_key = _field_types(section)
    if key not in types_by_key:
        raise ConfigError(f"unknown config key {dotted!r}; {section_name} has: {', '.join(types_by_key)}")
    setattr(section, key, _coerce(dotted, value, types_by_key[key], from_text))


def parse_override(text: str) -> tuple[str, str]:
    """'--train.lr=3e-4' or 'train.lr=3e-4' -> ('train.lr', '3e-4')."""
    body = text[2:] if text.startswith("--") else text
    key, sep, value = body.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"cannot read override {text!r}; write it as --section.key=value, e.g. --train.lr=3e-4")
    return key, value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the model preset's recipe (PRESET_RECIPES), then the TOML file (if any),
    then the overrides; validated."""
    settings = _file_settings(path) + [(*parse_override(text), True) for text in overrides]
    chosen = Config()  # read once to learn the preset, whose recipe goes under what was given
    for key, value, from_text in settings:
        _set(chosen, key, value, from_text)
    cfg = Config()
    for key, value in PRESET_RECIPES.get(chosen.model.preset, {}).items():
        _set(cfg, key, value, from_text=False)
    for key, value, from_text in settings:
        _set(cfg, key, value, from_text)
    validate(cfg)
    return cfg


def _file_settings(path: str | Path | None) -> list[tuple[str, object, bool]]:
    """The TOML file's settings as (section.key, value, from_text=False)."""
    if path is None:
        return []
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing TOML file (see configs/)") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    settings = []
    for section_name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section_name!r} must be a [section] table")
        settings += [(f"{section_name}.{key}", value, False) for key, value in table.items()]
    return settings


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> None:
    """Apply --section.key=value overrides in place, then validate the result."""
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, from_text=True)
    validate(cfg)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_replica(f: FaultConfig) -> None:
    """Replica mode's keys; the group's id is taken from REPLICA_GROUP_ID here when the config
    leaves it unset, so that the run directory (Config.run_dir) and config.json name the group."""
    _require(f.replica_groups >= 2, f"fault.replica_groups={f.replica_groups} is not valid; fault.recovery=replica needs "
             f"at least 2 replica groups (with one, use fault.recovery=storage or memory)")
    if f.replica_id == -1 and os.environ.get("REPLICA_GROUP_ID", "").strip():
        text = os.environ["REPLICA_GROUP_ID"].strip()
        _require(text.isdigit(), f"REPLICA_GROUP_ID={text!r} is not valid; it must be this group's number, 0 to {f.replica_groups - 1}")
        f.replica_id = int(text)
    # An unset id is left to the trainer to refuse (train/replica.py): a launcher reads the same
    # config for every group and gives each its id on the command line.
    _require(-1 <= f.replica_id < f.replica_groups, f"fault.replica_id={f.replica_id} is not valid; with "
             f"fault.replica_groups={f.replica_groups} it must be 0 to {f.replica_groups - 1}")
    _require(1 <= f.min_replicas <= f.replica_groups, f"fault.min_replicas={f.min_replicas} is not valid; it must be 1 to "
             f"fault.replica_groups={f.replica_groups}")


def validate(cfg: Config) -> None:
    """Values that have the right type but cannot work."""
    m, d, t, p = cfg.model, cfg.data, cfg.train, cfg.parallel
    _require(m.preset in PRESETS, f"model.preset={m.preset!r} is not valid; choose one of: {', '.join(PRESETS)}")
    for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size", "max_seq_len",
                 "rope_original_max_seq_len"):
        value = getattr(m, name)
        _require(value is None or value >= 1, f"model.{name}={value} is not valid; it must be at least 1")
    for name in ("rope_theta", "norm_eps", "rope_low_freq_factor"):
        value = getattr(m, name)
        _require(value is None or value > 0, f"model.{name}={value} is not valid; it must be positive")
    _require(m.rope_scaling_factor is None or m.rope_scaling_factor >= 1,
             f"model.rope_scaling_factor={m.rope_scaling_factor} is not valid; use 1 (no scaling) or more")
    args = resolve_model_args(cfg)
    _require(args.head_dim_override >= 0, f"model.head_dim_override={args.head_dim_override} is not valid; use 0 (d_model / n_heads) or a positive size")
    _require(args.head_dim_override or args.d_model % args.n_heads == 0, f"model.d_model={args.d_model} is not divisible by model.n_heads={args.n_heads}; pick sizes with d_model % n_heads == 0 or set model.head_dim_override")
    _require(args.head_dim % 2 == 0, f"head dimension {args.head_dim} must be even for rotary embeddings; change model.d_model, model.n_heads or model.head_dim_override")
    _require(args.rope_high_freq_factor > args.rope_low_freq_factor,
             f"model.rope_high_freq_factor={args.rope_high_freq_factor} is not valid; it must be above "
             f"model.rope_low_freq_factor={args.rope_low_freq_factor}")
    _require(args.n_heads % args.n_kv_heads == 0, f"model.n_heads={args.n_heads} is not divisible by model.n_kv_heads={args.n_kv_heads}; grouped-query attention needs n_heads % n_kv_heads == 0")
    _require(args.mlp_activation in ("silu", "gelu", "relu2"), f"model.mlp_activation={args.mlp_activation!r} is not valid; use silu, gelu or relu2")
    _require(args.gated_mlp or not args.is_moe, f"model.mlp_activation={args.mlp_activation} is not supported with model.n_experts={args.n_experts}; "
             "the experts are gated MLPs: use silu or gelu")
    _require(args.router_score in ("softmax", "sigmoid"), f"model.router_score={args.router_score!r} is not valid; use softmax or sigmoid")
    for name in ("attn_softcap", "logit_softcap", "n_experts", "expert_hidden", "n_shared_experts", "n_dense_layers", "aux_loss_coef", "bias_update_rate"):
        value = getattr(args, name)
        _require(value >= 0, f"model.{name}={value} is not valid; it must be 0 or more")
    _require(args.moe_every >= 1, f"model.moe_every={args.moe_every} is not valid; it must be at least 1 (1: every layer past the dense ones)")
    if args.is_moe:
        _require(1 <= args.top_k <= args.n_experts, f"model.top_k={args.top_k} is not valid; it must be between 1 and model.n_experts={args.n_experts}")
        _require(args.n_dense_layers < args.n_layers, f"model.n_dense_layers={args.n_dense_layers} leaves no MoE layer of model.n_layers={args.n_layers}; "
                 "use fewer dense layers or model.n_experts=0 for a dense model")
    _require(not (args.attn_softcap and p.cp > 1), f"model.attn_softcap={args.attn_softcap} is not supported with parallel.cp={p.cp}; "
             "context parallelism attends with SDPA, which cannot cap logits: use parallel.cp=1")
    _require(d.seq_len >= 2, f"data.seq_len={d.seq_len} is not valid; it must be at least 2")
    _require(d.vocab_size >= 257, f"data.vocab_size={d.vocab_size} is not valid; a BPE vocabulary needs more than the 256 bytes (e.g. 4096)")
    _require(t.batch_tokens >= 0, f"train.batch_tokens={t.batch_tokens} is not valid; use 0 or a positive number of tokens")
    if t.batch_tokens:
        _require(t.batch_tokens % d.seq_len == 0, f"train.batch_tokens={t.batch_tokens} is not a multiple of data.seq_len={d.seq_len}; "
                 f"use a multiple such as {max(1, t.batch_tokens // d.seq_len) * d.seq_len}")
    for name in ("max_steps", "batch_size", "eval_batches", "checkpoint_every", "keep_checkpoints", "eval_every"):
        value = getattr(t, name)
        _require(value >= 1, f"train.{name}={value} is not valid; it must be at least 1")
    for name in ("warmup_steps", "stop_at_step", "micro_batch_size", "samples", "sample_tokens", "schedule_steps"):
        value = getattr(t, name)
        _require(value >= 0, f"train.{name}={value} is not valid; it must be 0 or more")
    _require(t.lr > 0, f"train.lr={t.lr} is not valid; the learning rate must be positive")
    # An orthogonalised update has spectral norm ~1, so a Muon rate of 1 or more replaces the
    # weights at every step instead of nudging them.
    _require(0 < t.muon_lr < 1, f"train.muon_lr={t.muon_lr} is not valid; Muon's rate must be in (0, 1), e.g. 0.02")
    _require(0 <= t.muon_momentum < 1, f"train.muon_momentum={t.muon_momentum} is not valid; it must be in [0, 1), e.g. 0.95")
    for name in ("embed_lr", "head_lr"):
        value = getattr(t, name)
        _require(value >= 0, f"train.{name}={value} is not valid; use 0 for train.lr or a positive learning rate")
    _require(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio={t.min_lr_ratio} is not valid; it must be between 0 and 1")
    _require(0 < t.decay_fraction <= 1, f"train.decay_fraction={t.decay_fraction} is not valid; it must be in (0, 1]")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, f"train.beta1={t.beta1}, train.beta2={t.beta2} are not valid; each must be in [0, 1)")
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} is not valid; it must be 0 or more")
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} is not valid; use 0 to disable clipping or a positive norm")
    _require(t.time_limit_s >= 0, f"train.time_limit_s={t.time_limit_s} is not valid; use 0 for no limit or a positive number of seconds")
    f = cfg.fault
    _require(f.watchdog_s >= 0, f"fault.watchdog_s={f.watchdog_s} is not valid; use 0 to disable the watchdog or a positive number of seconds")
    _require(f.startup_timeout_s >= 0, f"fault.startup_timeout_s={f.startup_timeout_s} is not valid; use 0 for no bound or a positive number of seconds")
    _require(f.loss_spike_factor == 0 or f.loss_spike_factor > 1, f"fault.loss_spike_factor={f.loss_spike_factor} is not valid; use 0 to disable or a factor above 1 (e.g. 3)")
    for name in ("spike_window", "rollback_after"):
        _require(getattr(f, name) >= 1, f"fault.{name}={getattr(f, name)} is not valid; it must be at least 1")
    _require(f.memory_every >= 1, f"fault.memory_every={f.memory_every} is not valid; it must be at least 1 (steps between in-memory copies)")
    _require(f.ranks_per_host >= 0, f"fault.ranks_per_host={f.ranks_per_host} is not valid; use 0 for torchrun's LOCAL_WORLD_SIZE or the number of processes per host")
    _require(bool(f.memory_dir), "fault.memory_dir is empty; name a folder in host memory (e.g. /dev/shm/gigatrain)")
    _require(f.max_rollbacks >= 0, f"fault.max_rollbacks={f.max_rollbacks} is not valid; it must be 0 or more")
    if f.recovery == "replica":
        _validate_replica(f)
    # micro_batch_size is per rank: parallel.mesh.parallel_dims checks it against the layout.
    for name in DEGREES:
        value = getattr(p, name)
        _require(value >= 1 or value == -1, f"parallel.{name}={value} is not valid; use a positive degree or -1 to infer it from the world size")
    inferred = [n for n in DEGREES if getattr(p, n) == -1]
    _require(len(inferred) <= 1, f"parallel: only one degree may be -1, got {', '.join(inferred)}")
    for name in ("pp_microbatches", "pp_stages_per_rank"):
        value = getattr(p, name)
        _require(value >= 0, f"parallel.{name}={value} is not valid; it must be 0 (automatic) or more")
    _require(p.ep >= 1, f"parallel.ep={p.ep} is not valid; use 1 (no expert parallelism) or a number of ranks that divides model.n_experts")
    if p.ep > 1:
        _require(args.is_moe, f"parallel.ep={p.ep} needs a mixture-of-experts model, but model.preset={m.preset!r} "
                 f"with model.n_experts={args.n_experts} is dense; set parallel.ep=1 or model.n_experts to a multiple of {p.ep}")
        _require(args.n_experts % p.ep == 0, f"parallel.ep={p.ep} does not divide model.n_experts={args.n_experts}: each ep rank "
                 f"holds n_experts/ep whole experts; use an ep that divides {args.n_experts}")


def global_batch_size(cfg: Config) -> int:
    """Sequences per optimizer step: train.batch_tokens / data.seq_len when batch_tokens is set,
    else train.batch_size. The resolved layout (parallel.mesh.ParallelDims.global_batch) carries it."""
    t = cfg.train
    return t.batch_tokens // cfg.data.seq_len if t.batch_tokens else t.batch_size


def resolve_model_args(cfg: Config, vocab_size: int | None = None) -> ModelArgs:
    """The preset with the config's shape overrides; vocab_size from the tokenizer when given
    (model.vocab_size, when set, is the model's own and must hold every id of the tokenizer).

    The context length is the training sequence length for the small presets;
    the published presets keep theirs unless training uses a longer one.
    """
    m = cfg.model
    try:
        base = get_preset(m.preset)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    if m.vocab_size is not None and vocab_size is not None and m.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size} "
                          f"ids); drop model.vocab_size or use a tokenizer of at most {m.vocab_size} ids")
    args = with_overrides(base, vocab_size=m.vocab_size or vocab_size,
                          **{name: getattr(m, name) for name in MODEL_OVERRIDES if name != "vocab_size"})
    return dataclasses.replace(args, max_seq_len=max(args.max_seq_len, cfg.data.seq_len))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that load_config reads back (None values are left out)."""
    lines = []
    for section_name, section in to_dict(cfg).items():
        lines.append(f"[{section_name}]")
        for key, value in section.items():
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def from_dict(data: dict) -> Config:
    """Rebuild a Config from to_dict's output (e.g. a run directory's config.json), validated."""
    cfg = Config()
    for section_name, table in data.items():
        for key, value in table.items():
            _set(cfg, f"{section_name}.{key}", value, from_text=False)
    validate(cfg)
    return cfg
