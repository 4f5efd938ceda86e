"""Checkpoints in torch.distributed.checkpoint (DCP) format: committed atomically, checksummed,
written in the background.

Layout of a run's checkpoints::

    checkpoints/
      step_00000500/          one committed checkpoint
        .metadata, *.distcp   DCP: tensors only (model, optimizer state, RNG), keyed by name
        trainer_state.json    step, data-loader position, counters: plain JSON
        manifest.json         every file's size and sha256, verified before loading
      latest                  the name of the newest committed checkpoint
      .tmp-step_00000600/     a checkpoint being written (removed if its writer died)
      corrupt-step_00000400/  a committed checkpoint that failed verification, kept for inspection

A checkpoint is written into a temporary folder, checksummed, renamed into place once whole,
and only then named in ``latest``; a crash or a full disk at any point leaves the previous
checkpoint intact. Loading verifies the checksums and falls back to the previous checkpoint
if the newest is damaged; a checkpoint without a manifest is never loaded.

Checkpoints are untrusted input (a copy from elsewhere can carry a rehashed manifest). DCP
pickles its `.metadata`; it is read here with an unpickler that admits only the classes DCP
metadata is made of, so loading cannot run code, and a checkpoint that names anything else,
declares a non-tensor item or points outside its folder is refused. Tensors are read with
torch.load(weights_only=True). DCP files reshard: a checkpoint saved under one layout loads
under another.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gigatrain.paths import NO_SPACE_ERRNOS, sha256_file, write_atomic
from gigatrain.ranks import is_main_process

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names it."""


class CheckpointRefused(CheckpointError):
    """A checkpoint whose metadata holds what gigatrain never writes (code, non-tensor items,
    files outside its folder): tampered with or foreign. Never loaded."""


class CheckpointMismatch(CheckpointError):
    """A sound checkpoint of another model or other data than the one asked to load it: a
    mistake in the command, not damage, so no older checkpoint is tried instead."""


# DCP warns that it assumes one process when no process group exists; that is the intent.
# (A module-wide filter: background saves warn from their own thread.)
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _model_tensors(parts: list[nn.Module]) -> dict:
    """The parts' weights by their names in the whole model (pipeline stages keep those names)."""
    # Detached: plain tensors (not nn.Parameters), which every torch's async stager can copy.
    return {name: tensor.detach() for part in parts for name, tensor in get_model_state_dict(part).items()}


def _optimizer_tensors(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict:
    """The optimizers' per-parameter tensors keyed by parameter name; hyper-parameters are
    left out on purpose: they come from the config, and leaving them out keeps the DCP
    files free of pickled objects."""
    return {name: state for part, optimizer in zip(parts, optimizers)
            for name, state in get_optimizer_state_dict(part, optimizer)["state"].items()}


MANIFEST_FILE = "manifest.json"
CORRUPT_PREFIX = "corrupt-"


def _rank_and_world(group=None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather(value, group=None) -> list:
    """Every rank's `value` (small JSON-like objects between the job's own processes)."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _checkpoint_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE)


def _hash_share(folder: Path, names: list[str], group=None) -> dict:
    """Each rank hashes every world-th file, so checksumming takes 1/world of the time."""
    rank, world = _rank_and_world(group)
    share = {}
    for name in names[rank::world]:
        path = folder / name
        share[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return share


def verify(folder: Path, group=None) -> str | None:
    """What is wrong with a checkpoint's files against its manifest, or None if they match;
    the same answer on every rank (each checks its share of the files)."""
    problem = None
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        expected = manifest["files"]
    except FileNotFoundError:
        expected, problem = None, (f"{MANIFEST_FILE} is missing, so its files cannot be verified "
                                   f"(gigatrain writes one with every checkpoint)")
    except (OSError, ValueError, KeyError, TypeError) as err:
        expected, problem = None, f"{MANIFEST_FILE} is unreadable ({err})"
    if expected is not None:
        names = sorted(expected)
        rank, world = _rank_and_world(group)
        for name in names[rank::world]:
            path, want = folder / name, expected[name]
            if not path.is_file():
                problem = f"{name} is missing"
            elif path.stat().st_size != want["bytes"]:
                problem = f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or overwritten)"
            elif sha256_file(path) != want["sha256"]:
                problem = f"{name} does not match its sha256 in {MANIFEST_FILE}"
            if problem:
                break
    problems = [p for p in _gather(problem, group) if p]
    return problems[0] if problems else None


# Everything a .metadata written by DCP references (torch 2.11 to 2.13, any layout): data
# classes, torch.Size, dtypes, a layout looked up by name and an enum. None of them can run code.
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
        "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointRefused(f".metadata references {module}.{name}, which DCP metadata never holds "
                                f"(a tampered or foreign checkpoint); it was not loaded")


def _check_metadata(metadata: object) -> Metadata:
    """The metadata, if it is what gigatrain writes: tensors only, stored in files inside the folder."""
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict) \
            or not isinstance(getattr(metadata, "storage_meta", None), (StorageMeta, type(None))):
        raise CheckpointRefused(f".metadata holds a {type(metadata).__name__}, not DCP metadata; it was not loaded")
    for name, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):  # byte items are loaded with torch.load(weights_only=False)
            raise CheckpointRefused(f".metadata declares {name!r} as a {type(item).__name__}; gigatrain checkpoints "
                                    f"hold tensors only, so it was not loaded")
    for index, info in metadata.storage_data.items():
        file = getattr(info, "relative_path", None)
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo) or not isinstance(file, str) \
                or Path(file).name != file or not file.endswith(".distcp") or info.transform_descriptors:
            raise CheckpointRefused(f".metadata stores {getattr(index, 'fqn', index)!r} in {file!r}, not in a plain "
                                    f".distcp file of the checkpoint; it was not loaded")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader, but the metadata goes through _MetadataUnpickler and _check_metadata."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(path, "rb") as file:
                metadata = _check_metadata(_MetadataUnpickler(file).load())
        except CheckpointRefused:
            raise
        except Exception as err:  # truncated, garbage: unpickling fails in many ways
            raise CheckpointError(f".metadata is unreadable ({type(err).__name__}: {err})") from None
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, I/O error); the previous one stands."""


class BackgroundSaves:
    """At most one save in flight on a background thread (`_pending`, from `_executor`; None
    for synchronous saves): wait() for it, close() at the end. Storage checkpoints and the
    in-memory copies (checkpoint/memory.py) both save this way."""

    _pending: Future | None = None
    _executor: ThreadPoolExecutor | None = None

    def wait(self) -> bool:
        """Wait for the save in flight, if any; returns whether it was written."""
        if self._pending is None:
            return True
        pending, self._pending = self._pending, None
        return pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)


class Checkpointer(BackgroundSaves):
    """Saves checkpoints, synchronously or in the background (DCP's async_save).

    An asynchronous save copies the state to host memory (the only time training stalls),
    then a background thread writes the files, checksums them and commits the checkpoint,
    while training goes on. At most one save is in flight: a new one first waits for the
    last. The background collectives run on a gloo group of their own, so that they never
    interleave with the training collectives.
    """

    def __init__(self, directory: Path, keep: int, async_save: bool, faults=None, on_event=None):
        self.directory = directory
        self.keep = keep
        self.async_save = async_save
        self.faults = faults
        self.on_event = on_event or (lambda event: None)
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._pending: Future | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gigatrain-checkpoint") if async_save else None
        self.failures = 0
        self.last_failure: str | None = None  # why the last failed save failed, in one line

    def save(self, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None,
             trainer_state: dict) -> float:
        """Start (async) or write (sync) checkpoint `step`; returns the seconds training stalled."""
        started = time.perf_counter()
        self.wait()
        final = self.directory / checkpoint_name(step)
        tmp = self.directory / (TMP_PREFIX + final.name)
        if is_main_process():
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier(self.group)
        tensors = {"model": _model_tensors(parts), "rng": {"torch_cpu": torch.get_rng_state()}}
        if optimizers is not None:
            tensors["optimizer"] = _optimizer_tensors(parts, optimizers)
        writer = self._writer(tmp, step)
        state = dict(trainer_state)
        if self.async_save:
            response = dcp.async_save(tensors, checkpoint_id=str(tmp), storage_writer=writer, process_group=self.group)
            upload = response.upload_completion if hasattr(response, "upload_completion") else response
            stall = time.perf_counter() - started
            self._pending = self._executor.submit(self._finish, upload, step, tmp, final, state, started, stall)
            return stall
        error = None
        try:
            dcp.save(tensors, checkpoint_id=str(tmp), storage_writer=writer, process_group=self.group)
        except (Exception, CheckpointException) as err:  # DCP gathers every rank's failure; all ranks see it
            error = err
        done: Future = Future()  # so that wait() reports a synchronous save's outcome too
        done.set_result(self._finish(None, step, tmp, final, state, started, None, error))
        self._pending = done
        return time.perf_counter() - started

    def _writer(self, tmp: Path, step: int) -> _Writer:
        # A fresh writer per save: its blocking stager copies the state into host memory (any
        # torch from 2.11 on, DTensors included). Keeping one writer with its pinned copy cached
        # between saves failed on torch 2.11 ("unexpected pos" at the second save, on an H100).
        if self.faults is not None and self.faults.checkpoint_write_fails(step):
            return _FailingWriter(str(tmp))
        return _Writer(str(tmp))

    def _finish(self, upload: Future | None, step: int, tmp: Path, final: Path, trainer_state: dict,
                started: float, stall: float | None, error: BaseException | None = None) -> bool:
        """Checksum and commit a written checkpoint, on every rank (in the background for an
        async save). A failed write is reported, its partial files removed, and training goes on."""
        if upload is not None:
            try:
                upload.result()
            except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
                error = err
        share: dict | str = {}
        if error is None:
            try:
                if self.faults is not None:
                    self.faults.during_save(step)
                share = _hash_share(tmp, _checkpoint_files(tmp), self.group)
            except OSError as err:
                share = _describe(_named_if_disk_full(err, tmp))
        shares = _gather(share if error is None else _describe(error), self.group)
        failed = next((s for s in shares if isinstance(s, str)), None)
        if failed is None and is_main_process():
            try:
                self._commit(step, tmp, final, trainer_state, {k: v for s in shares for k, v in s.items()})
            except OSError as err:
                failed = _describe(_named_if_disk_full(err, tmp))
        failed = _gather(failed, self.group)[0]  # rank 0's commit decides for all
        stall_s = stall if stall is not None else time.perf_counter() - started
        if failed is not None:
            self.failures += 1
            self.last_failure = failed
            if is_main_process():
                shutil.rmtree(tmp, ignore_errors=True)
                self.on_event({"event": "checkpoint_failed", "step": step, "error": failed, "stall_s": stall_s})
                print(f"gigatrain: warning: checkpoint at step {step} was not written ({failed}); "
                      f"its partial files were removed and the previous checkpoint stands", file=sys.stderr, flush=True)
            return False
        if is_main_process():
            self.on_event({"event": "checkpoint", "step": step, "async": stall is not None, "stall_s": stall_s,
                           "write_s": time.perf_counter() - started})
        return True

    def _commit(self, step: int, tmp: Path, final: Path, trainer_state: dict, files: dict) -> None:
        write_atomic(tmp / STATE_FILE, json.dumps(trainer_state, indent=1, sort_keys=True))
        files[STATE_FILE] = {"bytes": (tmp / STATE_FILE).stat().st_size, "sha256": sha256_file(tmp / STATE_FILE)}
        write_atomic(tmp / MANIFEST_FILE, json.dumps({"format": 1, "step": step, "files": files}, indent=1, sort_keys=True))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. resumed and stopped at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(self.directory / LATEST_FILE, final.name + "\n")
        _fsync_dir(self.directory)
        prune(self.directory, self.keep)


class _Writer(FileSystemWriter):
    """DCP's file writer, whose failures say when the disk is full. torch's zip writer reports
    a short write as "unexpected pos 704 vs 598", the OSError(ENOSPC) behind it only in the
    exception's context, which is lost when DCP gathers the ranks' failures; so it is named
    here, on the rank where it happened."""

    def write_data(self, plan, planner):
        try:
            return super().write_data(plan, planner)
        except Exception as err:
            raise _named_if_disk_full(err, Path(self.path)) from err

    def finish(self, metadata, results) -> None:
        try:
            super().finish(metadata, results)
        except Exception as err:
            raise _named_if_disk_full(err, Path(self.path)) from err


class _FailingWriter(_Writer):
    """GIGATRAIN_FAULT=ckpt_fail: the disk is full. This rank's data file is written into
    /dev/full, which fails writes with ENOSPC as a full disk does, through torch's own writer."""

    def write_data(self, plan, planner):
        from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX

        first_file = Path(self.path) / f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"  # DCP's name for it
        first_file.symlink_to("/dev/full")
        return super().write_data(plan, planner)


def _named_if_disk_full(err: BaseException, path: Path) -> BaseException:
    """OSError(ENOSPC) naming the device and `path` if a full disk caused `err`, else `err`."""
    cause = err
    while cause is not None and not (isinstance(cause, OSError) and cause.errno in NO_SPACE_ERRNOS):
        cause = cause.__cause__ or cause.__context__
    return err if cause is None else OSError(cause.errno, f"no space left on {device_of(path)}", str(path))


def device_of(path: Path) -> str:
    """The file system holding `path`, as `df` names it: its device and where it is mounted."""
    path = Path(path).absolute()
    mount = next((p for p in [path, *path.parents] if os.path.ismount(p)), Path("/"))
    try:
        with open("/proc/self/mounts") as mounts:
            source = next((fields[0] for fields in map(str.split, mounts) if fields[1:2] == [str(mount)]), None)
    except OSError:
        source = None
    return f"{source} mounted at {mount}" if source else str(mount)


def _describe(err: BaseException) -> str:
    """One line for a failed save: DCP gathers every rank's exception into a CheckpointException."""
    if isinstance(err, CheckpointException):  # failures: rank -> (exception, stack)
        return "; ".join(f"rank {rank}: {_describe(failure[0] if isinstance(failure, tuple) else failure)}"
                         for rank, failure in sorted(err.failures.items()))
    if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS and err.filename:  # named by _named_if_disk_full
        return f"{err.strerror} ({err.filename})"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def committed(directory: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def partial(directory: Path) -> list[Path]:
    """Checkpoints whose writer died before committing them."""
    return sorted(directory.glob(TMP_PREFIX + "*")) if directory.is_dir() else []


def prune(directory: Path, keep: int) -> None:
    for old in committed(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in partial(directory):
        shutil.rmtree(stale, ignore_errors=True)


def latest(directory: Path) -> Path | None:
    """The checkpoint named by `latest`, or the newest committed one if the pointer is missing."""
    pointer = directory / LATEST_FILE
    if pointer.exists():
        named = directory / pointer.read_text().strip()
        if (named / STATE_FILE).exists():
            return named
    found = committed(directory)
    return found[-1] if found else None


def restore(directory: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None = None,
            report=print, group=None, repair: bool = True, check=None) -> tuple[Path, dict] | None:
    """Load the newest checkpoint that verifies, into `parts` (and `optimizers`); None if the
    run has none yet.

    A damaged or refused checkpoint is reported and the one before it is used. With `repair`
    (the trainer, which owns the folder), partial checkpoints are removed and a damaged one is
    renamed corrupt-step_... (kept for inspection) once an older one has loaded; if none
    can be loaded, nothing is renamed and CheckpointError says so. Readers (eval, generate)
    change nothing: a training run may be writing beside them. `check(path, trainer_state)`,
    if given, runs before any tensor is loaded and raises CheckpointMismatch to refuse it;
    a mismatch (of `check` or of the tensors' shapes) ends the search: an older checkpoint
    of the same run would not match either.
    """
    if repair and is_main_process():
        for stale in partial(directory):
            report(f"removing {stale.name}: a checkpoint whose writer stopped before committing it")
            shutil.rmtree(stale, ignore_errors=True)
    _barrier(group)
    candidates = list(reversed(committed(directory)))
    problems = []
    for i, path in enumerate(candidates):
        problem, verb = verify(path, group), "is damaged"
        if problem is None:
            try:
                state = load(path, parts, optimizers, check)
            except CheckpointMismatch:
                raise
            except CheckpointRefused as err:
                problem, verb = str(err), "was refused"
            except CheckpointError as err:
                problem = str(err)
            else:
                if repair and problems and is_main_process():
                    for bad in problems:
                        bad.rename(bad.with_name(CORRUPT_PREFIX + bad.name))
                    write_atomic(directory / LATEST_FILE, path.name + "\n")
                _barrier(group)
                return path, state
        fallback = candidates[i + 1].name if i + 1 < len(candidates) else None
        report(f"checkpoint {path} {verb}: {problem}; "
               + (f"falling back to {fallback}" if fallback else "no older checkpoint is left"))
        problems.append(path)
    if problems:
        raise CheckpointError(f"no loadable checkpoint in {directory}: all {len(problems)} are damaged or refused (see above); "
                              f"restore one from a backup, or move {directory} away to train from scratch")
    return None


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable ({err}); delete it to fall back to an older one") from None


def load(path: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None = None,
         check=None) -> dict:
    """Load weights (and optimizer state and RNG, when optimizers are given) in place, whatever
    the layout they were saved under; returns the trainer state saved with them. `check`: as
    for restore. The metadata is read safely and checked against the model before any tensor."""
    trainer_state = read_trainer_state(path)
    if check is not None:
        check(path, trainer_state)
    reader = _SafeReader(str(path))
    metadata = reader.read_metadata()
    # Each part's state dicts once: they name what DCP loads, and which names go back to which part.
    model_dicts = [get_model_state_dict(part) for part in parts]
    tensors = {"model": {name: t for own in model_dicts for name, t in own.items()}}
    if optimizers is not None:
        optimizer_dicts = [get_optimizer_state_dict(part, optimizer) for part, optimizer in zip(parts, optimizers)]
        tensors["optimizer"] = {name: state for full in optimizer_dicts for name, state in full["state"].items()}
        tensors["rng"] = {"torch_cpu": torch.get_rng_state()}
    _check_shapes(path, metadata, tensors)
    try:
        dcp.load(tensors, checkpoint_id=str(path), storage_reader=reader)
    except (Exception, CheckpointException) as err:  # DCP raises many kinds; the user needs the path and the cause
        raise CheckpointError(f"cannot load checkpoint {path}: {_describe(err)}") from None
    for part, own in zip(parts, model_dicts):
        set_model_state_dict(part, {name: tensors["model"][name] for name in own}, options=StateDictOptions(strict=True))
    if optimizers is not None:
        for part, optimizer, full in zip(parts, optimizers, optimizer_dicts):
            full["state"] = {name: tensors["optimizer"][name] for name in full["state"]}
            set_optimizer_state_dict(part, optimizer, full)
        torch.set_rng_state(tensors["rng"]["torch_cpu"])
    return trainer_state


def _check_shapes(path: Path, metadata: Metadata, tensors: dict) -> None:
    """CheckpointMismatch naming what differs if the checkpoint's tensors are not the ones asked for
    (another d_model, more layers): DCP would only fail halfway through loading, unhelpfully."""
    stored = metadata.state_dict_metadata
    wanted = dict(_flatten(tensors))
    differences = [f"{name} is missing" if name not in stored else
                   f"{name} is {list(stored[name].size)} there and {list(tensor.size())} here"
                   for name, tensor in wanted.items() if name not in stored or stored[name].size != tensor.size()]
    if differences:
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        raise CheckpointMismatch(f"checkpoint {path} holds another model than this one: {'; '.join(differences[:3])}{more}; "
                                 f"resume with the model settings it was trained with, or start a new run "
                                 f"with --run.dir=<new dir>")


def _flatten(tree: dict, prefix: str = ""):
    """(name, tensor) pairs of nested dicts, named as DCP names them: keys joined by dots."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value


MODEL_PREFIX = "model."  # Checkpointer.save keys the weights {"model": state_dict}; DCP joins keys with dots


class ModelTensors:
    """A committed checkpoint's model weights, read one tensor at a time (for export): host
    memory holds one tensor, never the whole model, whatever layout wrote the checkpoint.

    Opening verifies the manifest and reads the metadata through _SafeReader, as `load` does;
    `shapes` then names every weight (as in a one-process state dict) with its global shape
    and dtype (DCP's metadata records them, and which chunks each process saved)."""

    def __init__(self, path: Path):
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        self.path = path
        metadata = _SafeReader(str(path)).read_metadata()
        self.shapes = {name.removeprefix(MODEL_PREFIX): (torch.Size(item.size), item.properties.dtype)
                       for name, item in metadata.state_dict_metadata.items() if name.startswith(MODEL_PREFIX)}
        if not self.shapes:
            raise CheckpointError(f"checkpoint {path} holds no model weights")

    def read(self, name: str) -> torch.Tensor:
        """One weight, whole (DCP gathers its chunks from the files that hold them)."""
        shape, dtype = self.shapes[name]
        tensor = torch.empty(shape, dtype=dtype)
        try:
            dcp.load({MODEL_PREFIX + name: tensor}, storage_reader=_SafeReader(str(self.path)))
        except (Exception, CheckpointException) as err:
            raise CheckpointError(f"cannot read {name} from checkpoint {self.path}: {_describe(err)}") from None
        return tensor
