"""`gigatrain export`: a run's checkpoint as a Hugging Face folder (Llama, Qwen3, Mixtral or
Qwen3-MoE: interop/mapping.py picks the architecture from the model's options), which
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads with no code of ours.

    DIR/
      config.json, generation_config.json
      model.safetensors             (or model-00001-of-0000N.safetensors ... + model.safetensors.index.json)
      tokenizer.json, tokenizer_config.json   (Tokenizer.save_pretrained: AutoTokenizer gives the training ids)

Streaming: each weight is read from the DCP checkpoint on its own (whatever layout saved it),
converted (interop.mapping.to_hf; a layer's stacked experts become one tensor per expert, views
of the stacked one) and appended to its safetensors file, whose header is written first from
the shapes DCP's metadata records. Host memory holds one tensor at a time, never the whole
model, so a model larger than the machine's memory exports too: the peak is about two copies
of the largest tensor (the one DCP loads from the file and the one it copies that into),
which for a Llama is the embedding matrix and for a MoE model often one layer's stacked experts.

Nothing is half written: the folder is built in a temporary sibling and renamed into place
at the end; an existing non-empty --out is refused, never overwritten.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from gigatrain.checkpoint import dcp
from gigatrain.config import ConfigError, from_dict
from gigatrain.data.tokenizers import load_tokenizer
from gigatrain.interop import CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE
from gigatrain.interop.mapping import check_expert_bias, family_for, hf_config, hf_shapes, to_hf
from gigatrain.models.transformer import ModelArgs, Transformer
from gigatrain.parallel.device import pick_dtype
from gigatrain.rundir import RunDir

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default before 5.x: files that every hub tool takes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# safetensors' dtype names (https://github.com/huggingface/safetensors, the format's README)
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class ExportError(ConfigError):
    """A run, step or output folder that cannot be exported from or to: one line, exit 2."""


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MB', '2GiB', '1000000' (bytes): as transformers' max_shard_size reads them."""
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", text.strip().lower())
    if not match or match.group(2) not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[match.group(2)] < 1:
        raise ValueError(f"cannot read the size {text!r}; write bytes with an optional unit, e.g. 5GB, 500MB, 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


@dataclass
class ExportResult:
    out: Path
    step: int
    dtype: torch.dtype
    files: list[str]
    total_bytes: int


def trained_dtype(run_dir: RunDir) -> torch.dtype:
    """bfloat16 if the run trained in bf16 (autocast), else float32: the default of --dtype."""
    cfg, info = from_dict(run_dir.read_config()), run_dir.read_run_info() or {}
    autocast_dtype = pick_dtype(cfg.train.dtype, torch.device(info.get("device", "cpu")))
    return torch.bfloat16 if autocast_dtype == torch.bfloat16 else torch.float32


def pick_checkpoint(run_dir: RunDir, step: int | None, report) -> dcp.ModelTensors:
    """checkpoints/step_N, or the newest committed checkpoint that verifies (damaged ones are
    reported and skipped, as restore does, and left as they are: export only reads)."""
    directory = run_dir.checkpoints
    if step is not None:
        path = directory / dcp.checkpoint_name(step)
        if path not in dcp.committed(directory):
            have = ", ".join(str(int(p.name.removeprefix("step_"))) for p in dcp.committed(directory)) or "none"
            raise ExportError(f"{run_dir.path} has no checkpoint of step {step} (committed steps: {have})")
        return dcp.ModelTensors(path)
    candidates = list(reversed(dcp.committed(directory)))
    for path in candidates:
        try:
            return dcp.ModelTensors(path)
        except dcp.CheckpointError as err:
            report(f"{err}; trying the one before it")
    if candidates:
        raise ExportError(f"no loadable checkpoint in {directory}: all {len(candidates)} are damaged or refused (see above)")
    raise ExportError(f"{run_dir.path} has no checkpoint yet; train it first (gigatrain train --run.dir={run_dir.path})")


def _layer_order(name: str) -> tuple:
    """Embeddings, then the layers in order, then the final norm and head (as transformers lists them)."""
    match = re.match(r"layers\.(\d+)\.", name)
    return (1, int(match.group(1)), name) if match else (0 if name.startswith("tok_") else 2, 0, name)


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into files of at most max_shard_bytes, in order (a larger tensor gets a file
    of its own), as transformers shards."""
    shards, current, used = [], [], 0
    for name, size in sizes:
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def _header(entries: list[tuple[str, list[int], str, int]]) -> bytes:
    """A safetensors header: 8 bytes of little-endian length, then JSON naming each tensor's dtype,
    shape and byte range, padded with spaces to a multiple of 8 (the data stays aligned)."""
    table, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, size in entries:
        table[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def export(run_path: Path, out: Path, *, step: int | None = None, dtype: torch.dtype | None = None,
           max_shard_bytes: int | None = None, report=print) -> ExportResult:
    """Write `out` from the run's checkpoint (see the module's docstring)."""
    run_dir = RunDir(run_path)
    args = run_dir.model_args()
    family = family_for(args)  # what no transformers architecture computes is refused first
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder; export into a new folder")
    max_shard_bytes = max_shard_bytes or parse_size(DEFAULT_MAX_SHARD_SIZE)
    dtype = dtype or trained_dtype(run_dir)
    checkpoint = pick_checkpoint(run_dir, step, report)
    step = dcp.read_trainer_state(checkpoint.path)["step"]
    tokenizer = load_tokenizer(run_dir.tokenizer)

    # Tied embeddings: transformers stores the shared matrix once, as the embeddings.
    names = sorted((n for n in checkpoint.shapes if not (args.tie_embeddings and n == "output.weight")), key=_layer_order)
    element = torch.empty((), dtype=dtype).element_size()
    entries = {name: hf_shapes(name, checkpoint.shapes[name][0], args, family) for name in names}
    expected = {hf for name, shape in _model_shapes(args).items() for hf, _ in hf_shapes(name, shape, args, family)}
    if {hf for parts in entries.values() for hf, _ in parts} != expected:
        raise ExportError(f"checkpoint {checkpoint.path} does not hold the weights of the model in {run_dir.run_info}")
    for name in names:  # before anything is written: a bias only refuses (small: one number per expert)
        if name.endswith(".router.expert_bias"):
            check_expert_bias(name, checkpoint.read(name))
    sizes = [(name, sum(math.prod(shape) for _, shape in entries[name]) * element) for name in names]
    shards = plan_shards(sizes, max_shard_bytes)
    files = [WEIGHTS_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    tmp = out.parent / f".{out.name}.tmp-export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # ours: a previous export of this process that died
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise ExportError(f"cannot create {out} ({err.strerror}: {err.filename}); export into a folder you can write") from None
    try:
        size_of = dict(sizes)
        weight_map = {}
        for file, shard in zip(files, shards):
            header = [(hf, shape, _SAFETENSORS_DTYPES[dtype], math.prod(shape) * element)
                      for name in shard for hf, shape in entries[name]]
            with open(tmp / file, "wb") as handle:
                handle.write(_header(header))
                for name in shard:  # one checkpoint tensor in memory at a time (a stacked one: all its experts)
                    if entries[name]:
                        _append(handle, to_hf(name, checkpoint.read(name), args, family), dtype, file, weight_map)
                handle.flush()
                os.fsync(handle.fileno())
        total = sum(size_of.values())
        if len(files) > 1:
            _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        eot = tokenizer.eot_id  # documents are [eot] + text: eot begins and ends each one
        _write_json(tmp / CONFIG_FILE, hf_config(args, family, bos_token_id=eot, eos_token_id=eot, dtype=dtype))
        _write_json(tmp / GENERATION_CONFIG_FILE, {"bos_token_id": eot, "eos_token_id": eot, "do_sample": False})
        tokenizer.save_pretrained(tmp, model_max_length=args.max_seq_len)  # tokenizer.json + tokenizer_config.json
        try:
            os.rename(tmp, out)  # onto a missing or empty folder: atomic
        except OSError as err:
            raise ExportError(f"cannot create {out} ({err.strerror}); export into a new folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out=out, step=step, dtype=dtype, files=files, total_bytes=total)


def _append(handle, parts: list[tuple[str, torch.Tensor]], dtype: torch.dtype, file: str, weight_map: dict) -> None:
    """Write the parts of one checkpoint tensor (views of it) in the header's order."""
    for hf, tensor in parts:
        handle.write(tensor.to(dtype).contiguous().view(torch.uint8).numpy().data)
        weight_map[hf] = file


def _model_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """The tensors a one-process Transformer of `args` checkpoints, with their shapes (tied: no head)."""
    with torch.device("meta"):  # names and shapes only: no memory
        model = Transformer(args)
    return {n: t.shape for n, t in model.state_dict().items() if not (args.tie_embeddings and n == "output.weight")}


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")

