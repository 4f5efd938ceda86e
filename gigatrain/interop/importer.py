"""`gigatrain import HF_DIR --out RUN_DIR`: a local Hugging Face folder (Llama, Qwen3, Mixtral,
Qwen3-MoE) as a gigatrain run directory at step 0, which `gigatrain train --run.dir=RUN_DIR
--data.path=DATA` continues.

    HF_DIR/config.json                       interop/mapping.py reads it
    HF_DIR/model.safetensors                 or model.safetensors.index.json + its shards
    HF_DIR/tokenizer.json
 -> RUN_DIR/config.json, config.toml         the model as a preset plus overrides
    RUN_DIR/run.json                         model_args, as training writes it
    RUN_DIR/tokenizer.json                   the tokenizer, saved as `prepare` saves it
    RUN_DIR/checkpoints/step_00000000/       the weights, and a fresh optimizer's state

HF_DIR is untrusted input: nothing in it is executed (safetensors only, never a pickled
pytorch_model.bin; no remote code), and nothing outside it is read (the index must name plain
files inside it; links that lead out are refused). Tensors are streamed one at a time into the
model; the host holds the model and its optimizer state (what step 0 of training holds), never
a second copy of the weights.

The checkpoint's identity names the model and the tokenizer, and no data: the first training
run may use any data prepared with `gigatrain prepare ... --tokenizer RUN_DIR/tokenizer.json`,
and its loader starts at the beginning.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gigatrain.checkpoint.dcp import Checkpointer
from gigatrain.config import MODEL_OVERRIDES, Config, ConfigError, to_dict, to_toml, validate
from gigatrain.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from gigatrain.interop import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE
from gigatrain.interop.mapping import Family, from_hf, model_args_from_hf
from gigatrain.models.flops import param_counts
from gigatrain.models.presets import PRESETS
from gigatrain.models.transformer import ModelArgs, Transformer
from gigatrain.rundir import RunDir
from gigatrain.train.checkpointing import TrainState, model_identity, tokenizer_identity
from gigatrain.train.optim import build_optimizer

PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class Imported:
    run_dir: Path
    preset: str
    args: ModelArgs
    tensors: int


def import_hf(hf_dir: Path, out: Path) -> Imported:
    """Write run directory `out` from the Hugging Face folder `hf_dir`; ConfigError (one line) for
    what cannot be imported. Everything is read and checked before `out` is created."""
    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise ConfigError(f"{hf_dir} is not a folder; pass a local Hugging Face model folder (config.json, "
                          f"model.safetensors, tokenizer.json)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; pass a new run directory")
    config_path = _inside(hf_dir, CONFIG_FILE)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} is not a model config (a JSON object)")
    args, family = model_args_from_hf(config, str(config_path))
    tokenizer = load_tokenizer(_inside(hf_dir, TOKENIZER_FILE))
    if tokenizer.vocab_size > args.vocab_size:
        raise ConfigError(f"{hf_dir / TOKENIZER_FILE} has ids up to {tokenizer.vocab_size - 1}, beyond the model's "
                          f"vocab_size {args.vocab_size}; pass the tokenizer the model was trained with")
    cfg = imported_config(args, out)

    with torch.device("meta"):  # allocated once, then filled tensor by tensor
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_buffers()
    tensors = _load_weights(hf_dir, model, args, family)  # the experts' balancing bias stays zero

    created = not out.exists()
    try:
        _write_run(RunDir(out), cfg, model, args, tokenizer, hf_dir)
    except BaseException:
        if created:  # nothing half-written is left to look like a run
            shutil.rmtree(out, ignore_errors=True)
        raise
    return Imported(out, cfg.model.preset, args, tensors)


def imported_config(args: ModelArgs, out: Path) -> Config:
    """The run's config: the model as its nearest preset plus overrides, and the dataclass defaults
    for the rest, not load_config's: the preset is only the shape the model is written against, so
    its recipe (config.PRESET_RECIPES, tuned for that preset's own model) is not the imported
    model's. It continues with AdamW at train.lr for every group unless told otherwise."""
    preset, overrides = preset_and_overrides(args)
    cfg = Config()
    cfg.run.dir = str(out)
    cfg.model.preset = preset
    for name, value in overrides.items():
        setattr(cfg.model, name, value)
    validate(cfg)
    return cfg


def preset_and_overrides(args: ModelArgs) -> tuple[str, dict]:
    """The preset that shares most of the model's fields, and the fields that differ from it;
    vocab_size always (else training would size the model by its tokenizer)."""
    def differences(preset: ModelArgs) -> dict:
        return {name: getattr(args, name) for name in MODEL_OVERRIDES
                if name == "vocab_size" or getattr(args, name) != getattr(preset, name)}

    name = min(PRESETS, key=lambda preset: len(differences(PRESETS[preset])))
    return name, differences(PRESETS[name])


def _inside(hf_dir: Path, name: str) -> Path:
    """HF_DIR/name, if it is a plain file name of a file that lies inside HF_DIR (links included)."""
    if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
        raise ConfigError(f"{hf_dir}: {name!r} is not a plain file name inside the folder; refusing to read it")
    path = hf_dir / name
    if not path.is_file():
        raise ConfigError(f"{path} is missing; a Hugging Face model folder has {CONFIG_FILE}, {WEIGHTS_FILE} "
                          f"(or {INDEX_FILE} and its shards) and {TOKENIZER_FILE}")
    if not path.resolve().is_relative_to(hf_dir.resolve()):
        raise ConfigError(f"{path} leads outside {hf_dir}; refusing to read it")
    return path


def _weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of the model: the one file, or the shards its index names."""
    if (hf_dir / INDEX_FILE).exists():
        index_path = _inside(hf_dir, INDEX_FILE)
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{index_path} is not a safetensors index ({type(err).__name__}: {err})") from None
        return [_inside(hf_dir, name) for name in names]
    if (hf_dir / WEIGHTS_FILE).exists():
        return [_inside(hf_dir, WEIGHTS_FILE)]
    pickled = [name for name in PICKLED_WEIGHTS if (hf_dir / name).exists()]
    if pickled:
        raise ConfigError(f"{hf_dir} holds {pickled[0]}, pickled weights that loading could execute code from; "
                          f"gigatrain imports safetensors only: convert the folder to {WEIGHTS_FILE} first")
    raise ConfigError(f"{hf_dir / WEIGHTS_FILE} is missing (and there is no {INDEX_FILE}); a Hugging Face model "
                      f"folder has its weights in safetensors")


def _slots(name: str, param: torch.Tensor) -> set[tuple[str, int | None]]:
    """What filling `param` whole takes: each expert of a stacked expert tensor, else the tensor."""
    if ".feed_forward.experts." in name:
        return {(name, expert) for expert in range(param.shape[0])}
    return {(name, None)}


@torch.no_grad()
def _load_weights(hf_dir: Path, model: Transformer, args: ModelArgs, family: Family) -> int:
    """Copy every tensor of the safetensors files into `model`, one at a time (an expert's into
    its slot of the stacked tensor); returns how many of the model's tensors were filled."""
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {key for name, param in params.items() if not (args.tie_embeddings and name == "output.weight")
                for key in _slots(name, param)}
    loaded = set()
    for path in _weight_files(hf_dir):
        try:
            with safe_open(str(path), framework="pt") as file:
                for hf_name in file.keys():
                    if args.tie_embeddings and hf_name == "lm_head.weight":
                        continue  # a tied head is the embeddings: one matrix, loaded as those
                    try:
                        parts = from_hf(hf_name, file.get_tensor(hf_name), args, family)
                    except KeyError:
                        raise ConfigError(f"{path}: tensor {hf_name} is not part of a {family.architecture} gigatrain "
                                          f"can represent") from None
                    for name, expert, tensor in parts:
                        target = whole = params.get(name)
                        if target is None or (expert is not None and not expert < target.shape[0]):
                            # e.g. a layer beyond num_hidden_layers, an expert beyond num_experts
                            raise ConfigError(f"{path}: tensor {hf_name} has no place in the model config.json "
                                              f"describes")
                        if expert is not None:
                            target = target[expert]
                        if tuple(tensor.shape) != tuple(target.shape):
                            raise ConfigError(f"{path}: {hf_name} is {list(tensor.shape)}, the config makes it "
                                              f"{list(target.shape)}")
                        target.copy_(tensor)
                        loaded |= _slots(name, whole) if expert is None else {(name, expert)}
        except SafetensorError as err:
            raise ConfigError(f"{path} is not a readable safetensors file ({err})") from None
    missing = sorted({name if expert is None else f"{name}[{expert}]" for name, expert in expected - loaded})
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConfigError(f"{hf_dir}: the weights lack {', '.join(missing[:3])}{more} (gigatrain names); "
                          f"is the folder complete?")
    return len({name for name, _ in loaded})


def _write_run(run_dir: RunDir, cfg: Config, model: Transformer, args: ModelArgs, tokenizer: Tokenizer,
               hf_dir: Path) -> None:
    run_dir.path.mkdir(parents=True, exist_ok=True)
    # Saved as `prepare --tokenizer RUN_DIR/tokenizer.json` saves it: the same bytes, so the
    # identity's sha256 matches the data prepared with it.
    tokenizer.save(run_dir.path)
    run_dir.write_config(to_dict(cfg), to_toml(cfg))
    run_dir.write_run_info({"model_args": asdict(args),
                            "n_params": param_counts(args).total, "imported_from": str(hf_dir.resolve())})
    # A fresh optimizer's state (zero moments, step 0), in the form training saves: the first
    # training run resumes it as it resumes any checkpoint, and its first update is a fresh
    # AdamW's. (AdamW makes its state at its first step: one step at lr 0 on zero gradients.)
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        state["step"].zero_()
    state = TrainState()
    identity = {"model": model_identity(args),
                "tokenizer": tokenizer_identity(tokenizer.kind, tokenizer.vocab_size, run_dir.tokenizer),
                "data": None}  # no data yet: the first training run may use any
    checkpointer = Checkpointer(run_dir.checkpoints, cfg.train.keep_checkpoints, async_save=False)
    try:
        checkpointer.save(state.step, [model], [optimizer],
                          {"step": state.step, "train_time_s": state.train_time_s, "tokens_seen": 0,
                           "identity": identity, "imported_from": str(hf_dir.resolve())})
        if not checkpointer.wait():
            raise ConfigError(f"the checkpoint could not be written ({checkpointer.last_failure})")
    finally:
        checkpointer.close()

