"""In-memory checkpoints (fault.recovery=memory): each rank's exact state in host memory, outside
the training process, and a copy of it on a peer host.

Layout, on every host (a tmpfs such as /dev/shm survives the process, not the machine)::

    <memory_dir>/<run folder>/host<k>/
      step_00000012.rank00003.<tag>.pt   rank 3's state at step 12 (its own, or its peer's copy)
      .tmp-step_...pt                    a copy being written (renamed into place once whole)

One file holds one rank's local shards (model weights and buffers, optimizer state, RNG) and
the trainer state a storage checkpoint carries, saved with torch.save. The tag names the
layout (world size, ranks per host, parallel degrees): a copy only loads into the layout that
wrote it, shard for shard. Host k keeps its own ranks' copies and those of host k-1's ranks
(their peer is the same local rank on the next host), the newest KEEP steps of each.

The files are read as untrusted input: torch.load(weights_only=True), then checked against
the run, the rank, the layout and the model's tensors before anything is loaded; only files
of this module's naming pattern inside the run's own folder are ever deleted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gigatrain.checkpoint.dcp import CheckpointError, _gather

FORMAT = 1
KEEP = 2  # steps kept per rank: while one is being written, the one before is whole on every rank
TMP_PREFIX = ".tmp-"
_FILE = re.compile(r"step_(\d{8})\.rank(\d{5})\.([0-9a-f]{12})\.pt")


def file_name(step: int, rank: int, tag: str) -> str:
    return f"step_{step:08d}.rank{rank:05d}.{tag}.pt"


def parse_name(name: str) -> tuple[int, int, str] | None:
    """(step, rank, tag) of one of our files' names; None for any other name."""
    match = _FILE.fullmatch(name)
    return (int(match[1]), int(match[2]), match[3]) if match else None


def layout_tag(world: int, ranks_per_host: int, layout: dict) -> str:
    """Names the layout a copy was written under: shards only fit the layout that cut them."""
    text = json.dumps({"world": world, "ranks_per_host": ranks_per_host, "layout": layout}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Hosts:
    """Which host each rank is on (ranks_per_host consecutive ranks share one), and its peer:
    the same local rank on the next host holds a copy of its state."""
    rank: int
    world: int
    per_host: int

    def host(self, rank: int | None = None) -> int:
        return (self.rank if rank is None else rank) // self.per_host

    @property
    def n_hosts(self) -> int:
        return self.world // self.per_host

    def peer(self, rank: int | None = None) -> int | None:
        """The rank keeping a copy of `rank`'s state (None: one host, nowhere else to keep it)."""
        rank = self.rank if rank is None else rank
        return (rank + self.per_host) % self.world if self.n_hosts > 1 else None

    @property
    def ward(self) -> int | None:
        """The rank whose copy this rank keeps."""
        return (self.rank - self.per_host) % self.world if self.n_hosts > 1 else None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's own shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _templates(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> tuple[list, list]:
    """The state dicts a storage checkpoint loads into (dcp.load's), which a copy is loaded into too."""
    models = [get_model_state_dict(part) for part in parts]
    optims = [get_optimizer_state_dict(part, optimizer) for part, optimizer in zip(parts, optimizers)]
    return models, optims


def snapshot(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], header: dict,
             trainer_state: dict) -> dict:
    """This rank's state, on the host: local shards of the weights and of the optimizer's
    per-parameter state (its hyper-parameters come from the config, as in a storage
    checkpoint), the CPU RNG, and the trainer state (as JSON text, like trainer_state.json)."""
    def host_copy(tensor: torch.Tensor) -> torch.Tensor:
        local = _local(tensor.detach())
        # A copy sized to the shard: saving a view would save the whole storage behind it.
        return local.clone() if local.device.type == "cpu" else local.cpu()

    models, optims = _templates(parts, optimizers)
    return {**header, "trainer_state": json.dumps(trainer_state, sort_keys=True),
            "model": {name: host_copy(t) for own in models for name, t in own.items()},
            "optimizer": {name: {key: host_copy(t) for key, t in state.items()}
                          for full in optims for name, state in full["state"].items()},
            "rng": torch.get_rng_state()}


def encode(payload: dict) -> memoryview:
    """The copy's bytes, as a writable view (sent over the process group without another copy)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getbuffer()


def decode(data) -> dict:
    """A copy's contents (bytes or a file); weights_only: it can hold tensors and plain data only."""
    source = data if isinstance(data, (str, Path)) else io.BytesIO(data)
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, foreign: unpickling fails in many ways
        raise CheckpointError(f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"holds a {type(payload).__name__}, not an in-memory checkpoint")
    return payload


def check(payload: dict, header: dict, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
          templates: tuple[list, list] | None = None) -> dict:
    """The trainer state of a copy that fits this rank exactly (run, rank, layout, step and every
    tensor's name, shape and dtype); CheckpointError naming the first difference otherwise."""
    for key, want in header.items():
        if payload.get(key) != want:
            raise CheckpointError(f"its {key} is {payload.get(key)!r}, not {want!r}")
    models, optims = templates or _templates(parts, optimizers)
    wanted = {("model", name): t for own in models for name, t in own.items()}
    wanted.update({("optimizer", name, key): t for full in optims for name, state in full["state"].items()
                   for key, t in state.items()})
    model, optimizer = payload.get("model"), payload.get("optimizer")
    if not isinstance(model, dict) or not isinstance(optimizer, dict) or not all(isinstance(s, dict) for s in optimizer.values()):
        raise CheckpointError("it lacks the model or optimizer state")
    stored = {("model", name): t for name, t in model.items()}
    stored.update({("optimizer", name, key): t for name, state in optimizer.items() for key, t in state.items()})
    if stored.keys() != wanted.keys():
        differ = sorted(".".join(k) for k in stored.keys() ^ wanted.keys())
        raise CheckpointError(f"it holds other tensors than this model's ({', '.join(differ[:3])})")
    for key, template in wanted.items():
        local, saved = _local(template), stored[key]
        if not isinstance(saved, torch.Tensor) or saved.shape != local.shape or saved.dtype != local.dtype:
            raise CheckpointError(f"{'.'.join(key)} is {getattr(saved, 'shape', saved)} there and "
                                  f"{tuple(local.shape)} {local.dtype} here")
    rng = payload.get("rng")
    if not isinstance(rng, torch.Tensor) or rng.shape != torch.get_rng_state().shape:
        raise CheckpointError("its RNG state is missing or malformed")
    try:
        trainer_state = json.loads(payload["trainer_state"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"its trainer state is unreadable ({err})") from None
    if not isinstance(trainer_state, dict) or trainer_state.get("step") != payload.get("step"):
        raise CheckpointError("its trainer state is not of its step")
    return trainer_state


def apply(payload: dict, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
          templates: tuple[list, list]) -> None:
    """Load a checked copy in place, as dcp.load loads a storage checkpoint: shards into the
    state dicts' own tensors, then set_model_state_dict / set_optimizer_state_dict, then the RNG."""
    models, optims = templates
    with torch.no_grad():
        for part, own in zip(parts, models):
            for name, tensor in own.items():
                _local(tensor).copy_(payload["model"][name])
            set_model_state_dict(part, own, options=StateDictOptions(strict=True))
        for part, optimizer, full in zip(parts, optimizers, optims):
            for name, state in full["state"].items():
                for key, tensor in state.items():
                    _local(tensor).copy_(payload["optimizer"][name][key])
            set_optimizer_state_dict(part, optimizer, full)
    torch.set_rng_state(payload["rng"])


def _exchange(data: memoryview | bytes | None, send_to: int | None, receive_from: int | None, group) -> torch.Tensor | None:
    """Send `data` to one rank while receiving from another (either may be None), over the
    process group: a length, then the bytes, both posted before either is waited on."""
    size_out = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    size_in = torch.zeros(1, dtype=torch.int64)
    requests = ([dist.isend(size_out, send_to, group=group)] if send_to is not None else []) + \
               ([dist.irecv(size_in, receive_from, group=group)] if receive_from is not None else [])
    for request in requests:
        request.wait()
    received = torch.empty(int(size_in.item()), dtype=torch.uint8) if receive_from is not None else None
    if data is not None and not isinstance(data, memoryview):
        data = memoryview(bytearray(data))  # torch.frombuffer wants a writable buffer
    requests = ([dist.isend(torch.frombuffer(data, dtype=torch.uint8), send_to, group=group)]
                if send_to is not None and data else []) + \
               ([dist.irecv(received, receive_from, group=group)] if received is not None and received.numel() else [])
    for request in requests:
        request.wait()
    return received


@dataclass
class Restored:
    trainer_state: dict
    step: int
    from_peer: list[int]  # ranks whose own host had lost their copy

    @property
    def loaded_from(self) -> str:
        return "peer" if self.from_peer else "memory"


class MemoryStore:
    """This rank's copies in its host's folder, the copy kept for its ward, and the exchanges
    with its peer. Every method is called on every rank at once (they exchange over `group`)."""

    def __init__(self, folder: Path, run: str, hosts: Hosts, tag: str, group=None):
        self.run_folder = folder
        self.hosts = hosts
        self.tag = tag
        self.group = group
        self.folder = folder / f"host{hosts.host()}"
        self.header = {"format": FORMAT, "run": run, "rank": hosts.rank, "world": hosts.world, "tag": tag}

    # -- files ---------------------------------------------------------------------------------
    def files(self) -> list[tuple[int, int, str]]:
        """(step, rank, tag) of the copies in this host's folder."""
        if not self.folder.is_dir():
            return []
        return [parsed for parsed in map(parse_name, os.listdir(self.folder)) if parsed is not None]

    def _write(self, step: int, rank: int, data) -> None:
        """Atomically: a reader sees a whole copy or none."""
        final = self.folder / file_name(step, rank, self.tag)
        tmp = self.folder / (TMP_PREFIX + final.name)
        with open(tmp, "wb") as file:
            file.write(data)
        os.replace(tmp, final)

    def _prune(self, ranks: set[int]) -> None:
        """The newest KEEP steps of `ranks`' copies in this layout; their older and other
        layouts' copies, and their unfinished writes, are removed."""
        ours = sorted(((s, r, t) for s, r, t in self.files() if r in ranks), reverse=True)
        kept = {(s, r) for r in ranks for s in sorted({s for s, rr, t in ours if rr == r and t == self.tag})[-KEEP:]}
        for step, rank, tag in ours:
            if tag != self.tag or (step, rank) not in kept:
                (self.folder / file_name(step, rank, tag)).unlink(missing_ok=True)
        for rank in ranks:
            for stale in self.folder.glob(f"{TMP_PREFIX}step_*.rank{rank:05d}.*.pt"):
                stale.unlink(missing_ok=True)

    # -- saving --------------------------------------------------------------------------------
    def save(self, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
             trainer_state: dict) -> dict:
        """Write this rank's state at `step` into its host's folder and its peer's; returns
        what it cost (seconds per phase and bytes)."""
        started = time.perf_counter()
        data = encode(snapshot(parts, optimizers, {**self.header, "step": step}, trainer_state))
        copied = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._write(step, self.hosts.rank, data)
        written = time.perf_counter()
        ranks = {self.hosts.rank}
        if self.hosts.n_hosts > 1:
            received = _exchange(data, self.hosts.peer(), self.hosts.ward, self.group)
            self._write(step, self.hosts.ward, memoryview(received.numpy()))
            ranks.add(self.hosts.ward)
        self._prune(ranks)
        done = time.perf_counter()
        return {"bytes": len(data), "copy_s": copied - started, "write_s": written - copied, "peer_s": done - written}

    # -- restoring -----------------------------------------------------------------------------
    def newest_complete(self) -> tuple[int | None, bool, list[bool]]:
        """The newest step for which every rank's copy survives on its own host or its peer's
        (None: no such step), whether copies of another layout were seen, and, for that step,
        whether each rank's own host holds its copy. The same answer on every rank."""
        files = self.files()
        listings = _gather((self.hosts.host(), [(s, r) for s, r, t in files if t == self.tag],
                            any(t != self.tag for s, r, t in files)), self.group)
        holders: dict[tuple[int, int], set[int]] = {}
        for host, held, _ in listings:
            for key in held:
                holders.setdefault(tuple(key), set()).add(host)
        foreign = any(other for _, _, other in listings)
        steps = sorted({s for s, _ in holders}, reverse=True)
        world = range(self.hosts.world)
        step = next((s for s in steps if all((s, r) in holders for r in world)), None)
        own = [step is not None and self.hosts.host(r) in holders[(step, r)] for r in world]
        return step, foreign, own

    def load(self, step: int, own: list[bool], parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
             check_state=None) -> Restored:
        """Load the copies of `step` (newest_complete's answer) on every rank: its own from its
        host's folder, or, if that host lost it, from its peer over the process group. Every
        copy is checked before any is loaded; CheckpointError (on every rank) if one does not fit."""
        me, ward = self.hosts.rank, self.hosts.ward
        send, received = None, None
        if ward is not None and not own[ward]:  # my ward's host lost its copy: I hold it
            try:
                send = (self.folder / file_name(step, ward, self.tag)).read_bytes()
            except OSError:
                send = b""  # an empty copy: the ward reports it as unreadable
        if self.hosts.n_hosts > 1 and any(not o for o in own):
            received = _exchange(send, ward if send is not None else None, None if own[me] else self.hosts.peer(),
                                 self.group)
        problem, payload = None, None
        try:
            if own[me]:
                payload = decode(self.folder / file_name(step, me, self.tag))
            else:
                payload = decode(received.numpy().tobytes())
            templates = _templates(parts, optimizers)
            trainer_state = check(payload, {**self.header, "step": step}, parts, optimizers, templates)
            if check_state is not None:
                check_state(trainer_state)
        except (CheckpointError, OSError) as err:
            source = "its own host" if own[me] else f"rank {self.hosts.peer()}'s host"
            problem = f"rank {me}'s copy of step {step} from {source}: {err}"
        problems = [p for p in _gather(problem, self.group) if p]
        if problems:
            raise CheckpointError(problems[0])
        apply(payload, parts, optimizers, templates)
        return Restored(trainer_state, step, [r for r, o in enumerate(own) if not o])

    def discard_after(self, step: int) -> None:
        """Drop the copies newer than `step` (their states were abandoned by a rollback)."""
        for s, r, tag in self.files():
            if s > step and r in (self.hosts.rank, self.hosts.ward):
                (self.folder / file_name(s, r, tag)).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove this run's copies on this host (the run has finished: storage holds its
        state), then the run's folders if nothing else is left in them."""
        for s, r, tag in self.files():
            (self.folder / file_name(s, r, tag)).unlink(missing_ok=True)
        if self.folder.is_dir():
            for stale in self.folder.glob(f"{TMP_PREFIX}step_*.rank*.pt"):
                if parse_name(stale.name.removeprefix(TMP_PREFIX)):
                    stale.unlink(missing_ok=True)
        if dist.is_initialized():
            dist.barrier(group=self.group)
        for folder in (self.folder, self.run_folder):
            try:
                folder.rmdir()
            except OSError:  # not empty (another host's ranks, a file not ours) or already gone
                pass
