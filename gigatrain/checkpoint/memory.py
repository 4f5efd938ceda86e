"""In-memory checkpoints (fault.recovery=memory): each rank's exact state in host memory, outside
the training process, and a copy of it on a peer host.

Layout, on every host (a tmpfs such as /dev/shm survives the process, not the machine)::

    <memory_dir>/<run folder>/host<k>/
      step_00000012.rank00003.<tag>.gtmem   rank 3's state at step 12 (its own, or its peer's copy)
      .tmp-step_...gtmem                    a copy being written (renamed into place once whole)

One file holds one rank's local shards (model weights and buffers, optimizer state, CPU RNG)
and the trainer state a storage checkpoint carries: MAGIC, two sizes, the tensors' raw bytes,
then a JSON header (run, rank, layout, step, trainer state, and each tensor's name, dtype,
shape and place in the bytes). The tag names the layout (world size, ranks per host, parallel
degrees): a copy only loads into the layout that wrote it, shard for shard. Host k keeps its
own ranks' copies and those of host k-1's ranks (their peer is the same local rank on the next
host), the newest KEEP steps of each.

The files are read as untrusted input: nothing is unpickled (the header is JSON, the rest raw
bytes), and a copy is checked against the run, the rank, the layout and the model's tensors
before anything is loaded; only files of this module's naming pattern inside the run's own
folder are ever deleted.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
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

from gigatrain.checkpoint.dcp import BackgroundSaves, CheckpointError, _gather

FORMAT = 1
MAGIC = b"GTMEMv1\n"  # a copy's first bytes (see write_copy)
ALIGN = 64  # each tensor's bytes start at a multiple of this in a copy's data
KEEP = 2  # steps kept per rank: while one is being written, the one before is whole on every rank
TMP_PREFIX = ".tmp-"
_FILE = re.compile(r"step_(\d{8})\.rank(\d{5})\.([0-9a-f]{12})\.gtmem")


def file_name(step: int, rank: int, tag: str) -> str:
    return f"step_{step:08d}.rank{rank:05d}.{tag}.gtmem"


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


def _named_tensors(templates: tuple[list, list]) -> dict[str, torch.Tensor]:
    """Every tensor of the state dicts by one name: model/<name>, optimizer/<name>/<key>."""
    models, optims = templates
    named = {f"model/{name}": t for own in models for name, t in own.items()}
    named.update({f"optimizer/{name}/{key}": t for full in optims for name, state in full["state"].items()
                  for key, t in state.items()})
    return named


class StateTensors:
    """A rank's state tensors by name (`_named_tensors`), built again only when the model's or
    the optimizers' tensors are not the ones of the last call. Building the state dicts was
    most of a copy's stall (6 of 8 ms for the tiny model on CPU), while between two copies
    training only updates the same tensors in place."""

    def __init__(self):
        self._identity: tuple | None = None
        self._named: dict[str, torch.Tensor] = {}

    def __call__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
        tensors = [t for part in parts for t in (*part.parameters(), *part.buffers())]
        tensors += [t for optimizer in optimizers for state in optimizer.state.values() for t in state.values()
                    if isinstance(t, torch.Tensor)]
        # The objects and their storage: a tensor replaced, or given new storage, rebuilds the names.
        identity = tuple((id(t), _local(t).data_ptr()) for t in tensors)
        if identity != self._identity:
            self._named, self._identity = _named_tensors(_templates(parts, optimizers)), identity
        return self._named


def _layout(named: dict[str, torch.Tensor]) -> list[dict]:
    """Where each local shard lies in a copy's data: in name order, each at a 64-byte boundary."""
    entries, offset = [], 0
    for name in sorted(named):
        local = _local(named[name])
        nbytes = local.numel() * local.element_size()
        entries.append({"name": name, "dtype": str(local.dtype).removeprefix("torch."), "shape": list(local.shape),
                        "offset": offset, "nbytes": nbytes})
        offset += -(-nbytes // ALIGN) * ALIGN
    return entries


def _view(data: torch.Tensor, entry: dict) -> torch.Tensor:
    dtype = getattr(torch, entry["dtype"])
    return data[entry["offset"]:entry["offset"] + entry["nbytes"]].view(dtype).view(entry["shape"])


@dataclass
class Copy:
    """One rank's state as it is written and sent: the tensors' bytes, and a JSON header naming
    the run, rank, layout, step, trainer state and where each tensor lies in the bytes."""
    data: torch.Tensor  # uint8, on the host
    header: dict

    def header_bytes(self) -> bytes:
        return json.dumps(self.header, sort_keys=True).encode()


def snapshot(state: dict[str, torch.Tensor], identity: dict, trainer_state: dict,
             buffer: torch.Tensor | None = None) -> Copy:
    """This rank's state (`state`: StateTensors' names), copied into host memory (into `buffer`
    if it has the right size, so that a copy every few steps allocates nothing): local shards of
    the weights and of the optimizer's per-parameter state (its hyper-parameters come from the
    config, as in a storage checkpoint), the CPU RNG and the trainer state. The only part of a
    copy training waits for."""
    named = {**state, "rng": torch.get_rng_state()}
    entries = _layout(named)
    size = entries[-1]["offset"] + entries[-1]["nbytes"] if entries else 0
    if buffer is None or buffer.numel() != size:
        pin = torch.cuda.is_available() and any(_local(t).is_cuda for t in named.values())
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    with torch.no_grad():
        for entry in entries:
            _view(buffer, entry).copy_(_local(named[entry["name"]].detach()), non_blocking=True)
    if buffer.is_pinned():
        torch.cuda.synchronize()
    return Copy(buffer, {**identity, "trainer_state": trainer_state, "tensors": entries})


def write_copy(path: Path, data: torch.Tensor, header: bytes) -> None:
    """MAGIC, the sizes of the data and of the header, the data, the header; atomically (a
    reader sees a whole copy or none)."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    with open(tmp, "wb") as file:
        file.write(MAGIC + struct.pack("<QQ", data.numel(), len(header)))
        file.write(memoryview(data.numpy()))
        file.write(header)
    os.replace(tmp, path)


def read_copy(source: Path | tuple[torch.Tensor, bytes]) -> Copy:
    """A copy from its file (mapped, not read) or as received from a peer (data, header). Only
    JSON is parsed: the file cannot run code. CheckpointError if it is not well formed."""
    if isinstance(source, Path):
        with open(source, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            head = file.read(len(MAGIC) + 16)
            if len(head) < len(MAGIC) + 16 or head[:len(MAGIC)] != MAGIC:
                raise CheckpointError("is not an in-memory checkpoint (no gigatrain header)")
            data_size, header_size = struct.unpack("<QQ", head[len(MAGIC):])
            if len(head) + data_size + header_size != size:
                raise CheckpointError(f"has {size} bytes, its header says {len(head) + data_size + header_size} (truncated?)")
            mapped = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) if size else b""
        data = torch.frombuffer(mapped, dtype=torch.uint8, offset=len(head), count=data_size) if data_size \
            else torch.empty(0, dtype=torch.uint8)
        header = bytes(mapped[len(head) + data_size:]) if size else b""
    else:
        data, header = source
    try:
        parsed = json.loads(header)
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"has an unreadable header ({err})") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("tensors"), list):
        raise CheckpointError("has a header without its list of tensors")
    for entry in parsed["tensors"]:
        try:
            dtype = getattr(torch, entry["dtype"]) if isinstance(entry["dtype"], str) else None
            fits = isinstance(dtype, torch.dtype) and all(isinstance(n, int) and n >= 0 for n in
                                                          [entry["offset"], entry["nbytes"], *entry["shape"]])
            fits = fits and entry["offset"] + entry["nbytes"] <= data.numel() \
                and entry["nbytes"] == math.prod(entry["shape"]) * dtype.itemsize and entry["offset"] % ALIGN == 0
        except (KeyError, TypeError, AttributeError):
            fits = False
        if not fits:
            raise CheckpointError(f"has a malformed tensor entry {str(entry)[:200]}")
    return Copy(data, parsed)


def check(copy: Copy, identity: dict, templates: tuple[list, list]) -> dict:
    """The trainer state of a copy that fits this rank exactly (run, rank, layout, step and every
    tensor's name, shape and dtype); CheckpointError naming the first difference otherwise."""
    for key, want in identity.items():
        if copy.header.get(key) != want:
            raise CheckpointError(f"its {key} is {copy.header.get(key)!r}, not {want!r}")
    named = _named_tensors(templates)
    named["rng"] = torch.get_rng_state()
    wanted = {entry["name"]: entry for entry in _layout(named)}
    stored = {entry["name"]: entry for entry in copy.header["tensors"]}
    if stored.keys() != wanted.keys():
        differ = sorted(stored.keys() ^ wanted.keys())
        raise CheckpointError(f"it holds other tensors than this model's ({', '.join(differ[:3])})")
    for name, want in wanted.items():
        got = stored[name]
        if (got["shape"], got["dtype"]) != (want["shape"], want["dtype"]):
            raise CheckpointError(f"{name} is {got['shape']} {got['dtype']} there and {want['shape']} {want['dtype']} here")
    trainer_state = copy.header.get("trainer_state")
    if not isinstance(trainer_state, dict) or trainer_state.get("step") != copy.header.get("step"):
        raise CheckpointError("its trainer state is not of its step")
    return trainer_state


def apply(copy: Copy, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
          templates: tuple[list, list]) -> None:
    """Load a checked copy in place, as dcp.load loads a storage checkpoint: shards into the
    state dicts' own tensors, then set_model_state_dict / set_optimizer_state_dict, then the RNG."""
    models, optims = templates
    named = _named_tensors(templates)
    entries = {entry["name"]: entry for entry in copy.header["tensors"]}
    with torch.no_grad():
        for name, tensor in named.items():
            _local(tensor).copy_(_view(copy.data, entries[name]))
        for part, own in zip(parts, models):
            set_model_state_dict(part, own, options=StateDictOptions(strict=True))
        for part, optimizer, full in zip(parts, optimizers, optims):
            set_optimizer_state_dict(part, optimizer, full)
    torch.set_rng_state(_view(copy.data, entries["rng"]).clone())


def _exchange(send: tuple[torch.Tensor, bytes] | None, send_to: int | None, receive_from: int | None, group,
              into: torch.Tensor | None = None) -> tuple[torch.Tensor, bytes] | None:
    """Send a copy to one rank while receiving one from another (either may be None), over the
    process group: the two sizes, then the data and the header, each posted before any is
    waited on. `into`: a buffer for the data, used if it has the right size."""
    def run(pairs):
        requests = [dist.isend(t, send_to, group=group) for t in pairs[0]] + \
                   [dist.irecv(t, receive_from, group=group) for t in pairs[1]]
        for request in requests:
            request.wait()

    data_out, header_out = send if send is not None else (None, None)
    header = torch.frombuffer(bytearray(header_out), dtype=torch.uint8) if header_out else torch.empty(0, dtype=torch.uint8)
    sizes_in = torch.zeros(2, dtype=torch.int64)
    run(([torch.tensor([data_out.numel(), header.numel()])] if send_to is not None else [],
         [sizes_in] if receive_from is not None else []))
    received = None
    if receive_from is not None:
        data_size, header_size = sizes_in.tolist()
        data = into if into is not None and into.numel() == data_size else torch.empty(data_size, dtype=torch.uint8)
        received = (data, torch.empty(header_size, dtype=torch.uint8))
    run(([t for t in (data_out, header) if t.numel()] if send_to is not None else [],
         [t for t in received if t.numel()] if received is not None else []))
    return (received[0], received[1].numpy().tobytes()) if received is not None else None


@dataclass
class Restored:
    trainer_state: dict
    step: int
    from_peer: list[int]  # ranks whose own host had lost their copy

    @property
    def loaded_from(self) -> str:
        return "peer" if self.from_peer else "memory"


class MemoryStore(BackgroundSaves):
    """This rank's copies in its host's folder, the copy kept for its ward, and the exchanges
    with its peer. Every method is called on every rank at once (they exchange over `group`).

    A save copies the state into a host buffer (reused from save to save; the only time
    training waits), then a background thread writes it into the host's folder and exchanges
    it with the peer and the ward. At most one save is in flight: the next one first waits."""

    def __init__(self, folder: Path, run: str, hosts: Hosts, tag: str, group=None, on_event=None,
                 background: bool = True):
        self.run_folder = folder
        self.hosts = hosts
        self.tag = tag
        self.group = group
        self.on_event = on_event or (lambda record: None)
        self.folder = folder / f"host{hosts.host()}"
        self.identity = {"format": FORMAT, "run": run, "rank": hosts.rank, "world": hosts.world, "tag": tag}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gigatrain-memory") if background else None
        self._pending: Future | None = None
        self._buffer: torch.Tensor | None = None  # this rank's copy, reused
        self._received: torch.Tensor | None = None  # the ward's copy, reused
        self._state = StateTensors()
        self.failures = 0

    # -- files ---------------------------------------------------------------------------------
    def files(self) -> list[tuple[int, int, str]]:
        """(step, rank, tag) of the copies in this host's folder."""
        if not self.folder.is_dir():
            return []
        return [parsed for parsed in map(parse_name, os.listdir(self.folder)) if parsed is not None]

    def path(self, step: int, rank: int, tag: str | None = None) -> Path:
        return self.folder / file_name(step, rank, tag or self.tag)

    def _prune(self, ranks: set[int]) -> None:
        """The newest KEEP steps of `ranks`' copies in this layout; their older and other
        layouts' copies, and their unfinished writes, are removed."""
        ours = [(s, r, t) for s, r, t in self.files() if r in ranks]
        kept = {(s, r) for r in ranks for s in sorted({s for s, rr, t in ours if rr == r and t == self.tag})[-KEEP:]}
        for step, rank, tag in ours:
            if tag != self.tag or (step, rank) not in kept:
                self.path(step, rank, tag).unlink(missing_ok=True)
        for stale in self.folder.glob(TMP_PREFIX + "*"):
            parsed = parse_name(stale.name.removeprefix(TMP_PREFIX))
            if parsed is not None and parsed[1] in ranks:
                stale.unlink(missing_ok=True)

    # -- saving --------------------------------------------------------------------------------
    def save(self, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
             trainer_state: dict) -> float:
        """Copy this rank's state at `step` and start writing it (into its host's folder and its
        peer's); returns the seconds training stalled for it."""
        started = time.perf_counter()
        self.wait()
        copy = snapshot(self._state(parts, optimizers), {**self.identity, "step": step}, trainer_state, self._buffer)
        self._buffer = copy.data
        stall = time.perf_counter() - started
        if self._executor is None:
            self._finish(step, copy, stall)
        else:
            self._pending = self._executor.submit(self._finish, step, copy, stall)
        return stall

    def _finish(self, step: int, copy: Copy, stall: float) -> bool:
        """Write the copy into this host's folder, exchange copies with the peer and the ward
        (whatever the write did: they wait for this rank), and write the ward's."""
        started = time.perf_counter()
        problem = None
        header = copy.header_bytes()
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_copy(self.path(step, self.hosts.rank), copy.data, header)
        except OSError as err:
            problem = f"{self.folder}: {err.strerror or err}"
        written = time.perf_counter()
        ranks = {self.hosts.rank}
        try:
            if self.hosts.n_hosts > 1:
                data, ward_header = _exchange((copy.data, header), self.hosts.peer(), self.hosts.ward, self.group,
                                              into=self._received)
                self._received = data
                if problem is None:
                    write_copy(self.path(step, self.hosts.ward), data, ward_header)
                    ranks.add(self.hosts.ward)
            self._prune(ranks)
        except OSError as err:
            problem = problem or f"{self.folder}: {err.strerror or err}"
        except Exception as err:  # the peer is gone (it died: this process's end is near too)
            problem = problem or f"the exchange with rank {self.hosts.peer()} failed ({type(err).__name__})"
        if problem is not None:
            self.failures += 1
            self.on_event({"event": "memory_checkpoint_failed", "step": step, "error": problem, "stall_s": stall})
            print(f"gigatrain: warning: rank {self.hosts.rank}'s in-memory copy of step {step} was not kept "
                  f"({problem}); training goes on", file=sys.stderr, flush=True)
            return False
        self.on_event({"event": "memory_checkpoint", "step": step, "stall_s": stall, "bytes": copy.data.numel(),
                       "write_s": written - started, "peer_s": time.perf_counter() - written})
        return True

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
        me, ward, peer = self.hosts.rank, self.hosts.ward, self.hosts.peer()
        send, received = None, None
        if ward is not None and not own[ward]:  # my ward's host lost its copy: I hold it
            try:
                kept = read_copy(self.path(step, ward))
                send = (kept.data, kept.header_bytes())
            except (CheckpointError, OSError):
                send = (torch.empty(0, dtype=torch.uint8), b"{}")  # the ward reports it as unreadable
        if self.hosts.n_hosts > 1 and not all(own):
            received = _exchange(send, ward if send is not None else None, None if own[me] else peer, self.group)
        problem, copy, templates = None, None, None
        try:
            copy = read_copy(self.path(step, me) if own[me] else received)
            templates = _templates(parts, optimizers)
            trainer_state = check(copy, {**self.identity, "step": step}, templates)
            if check_state is not None:
                check_state(trainer_state)
        except (CheckpointError, OSError) as err:
            source = "its own host" if own[me] else f"rank {peer}'s host"
            problem = f"rank {me}'s copy of step {step} from {source} {err}"
        problems = [p for p in _gather(problem, self.group) if p]
        if problems:
            raise CheckpointError(problems[0])
        apply(copy, parts, optimizers, templates)
        return Restored(trainer_state, step, [r for r, o in enumerate(own) if not o])

    def discard_after(self, step: int) -> None:
        """Drop the copies newer than `step` (their states were abandoned by a rollback)."""
        self.wait()
        for s, r, tag in self.files():
            if s > step and r in (self.hosts.rank, self.hosts.ward):
                (self.folder / file_name(s, r, tag)).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove this run's copies on this host (the run has finished: storage holds its
        state), then the run's folders if nothing else is left in them."""
        self.wait()
        for s, r, tag in self.files():
            (self.folder / file_name(s, r, tag)).unlink(missing_ok=True)
        if self.folder.is_dir():
            for stale in self.folder.glob(TMP_PREFIX + "*"):
                if parse_name(stale.name.removeprefix(TMP_PREFIX)):
                    stale.unlink(missing_ok=True)
        if dist.is_initialized():
            dist.barrier(group=self.group)
        for folder in (self.folder, self.run_folder):
            try:
                folder.rmdir()
            except OSError:  # not empty (another host's ranks, a file not ours) or already gone
                pass
