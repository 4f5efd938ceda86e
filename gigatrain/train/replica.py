"""Replica groups (`fault.recovery=replica`, docs/fault-tolerance.md "Replica groups"): this
torchrun job is one of fault.replica_groups identical jobs that train the same model on their
own shares of each batch, and a failed group drops out of the step while the others go on.

Everything across groups is torchft's: a Lighthouse decides each step's quorum (the groups
alive), a Manager per rank joins it and tells whether the step may commit, a fault-tolerant
process group (gloo, or NCCL on GPUs) reconfigured for each quorum averages the gradients, and
a restarted group receives the live state of a healthy one through the Manager's state_dict
callbacks (torchft's HTTP transport, its loads restricted to tensors and plain values: what a
peer sends is never unpickled as objects). Inside a group the normal
process group and mesh hold (FSDP, TP, ...); every group has the same layout, so rank i of one
group exchanges its own gradient shards and state with rank i of the others.
"""

from __future__ import annotations

import importlib.util
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from gigatrain.config import Config, ConfigError, FaultConfig

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"
LIGHTHOUSE_PORT = 29510  # `gigatrain lighthouse`'s default, as the launchers expect
FIRST_QUORUM_WAIT_S = 60.0  # how long the groups of a new run wait for each other before step 1


def lighthouse_address(cfg: FaultConfig) -> str:
    """The Lighthouse this group joins; a ConfigError, before any process group exists, when
    torchft is missing or no Lighthouse is named."""
    if importlib.util.find_spec("torchft") is None:
        raise ConfigError("fault.recovery=replica needs torchft, which is not installed; pip install 'gigatrain[ft]' "
                          "(torchft==0.2.0), or use fault.recovery=storage")
    if cfg.replica_id == -1:
        raise ConfigError("fault.recovery=replica needs this replica group's number: pass "
                          f"--fault.replica_id=I (0 to {cfg.replica_groups - 1}) or set REPLICA_GROUP_ID")
    address = cfg.lighthouse or os.environ.get(LIGHTHOUSE_ENV, "")
    if not address:
        raise ConfigError(f"fault.recovery=replica needs the torchft Lighthouse's address: pass "
                          f"--fault.lighthouse=http://HOST:{LIGHTHOUSE_PORT} or set {LIGHTHOUSE_ENV} "
                          f"(start one with `python -m gigatrain lighthouse`)")
    return address


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _to_local(value):
    """A state dict with each DTensor replaced by this rank's shard (what rank i of another group holds)."""
    if isinstance(value, dict):
        return {key: _to_local(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_local(item) for item in value]
    return _local(value) if isinstance(value, torch.Tensor) else value


def _tensors_only_transport(timeout: timedelta):
    """torchft's HTTP checkpoint transport, reading what a peer sends with weights_only=True:
    torchft's own reader unpickles arbitrary objects (for lr schedulers), and the state
    exchanged here is tensors, numbers, strings and containers only."""
    import urllib.request

    from torch.distributed._serialization import _streaming_load
    from torchft.checkpointing.http_transport import HTTPTransport

    class TensorsOnlyTransport(HTTPTransport):
        @classmethod
        def _load_from_address(cls, address: str, timeout: timedelta) -> object:
            with urllib.request.urlopen(address, timeout=timeout.total_seconds()) as response:
                return _streaming_load(response, weights_only=True)

    return TensorsOnlyTransport(timeout=timeout, num_chunks=0)


class ReplicaGroup:
    """This rank's part in the replica groups: the quorum at each step's start, the gradients'
    average, whether the step commits, and the live state a rejoining group receives."""

    def __init__(self, cfg: Config, lighthouse: str, *, group_rank: int, group_size: int, parallel, optimizers: list,
                 loader, state, guard, checkpoints, metrics, started_at: float):
        self.cfg, self.lighthouse = cfg, lighthouse
        self.replica_id = cfg.fault.replica_id
        self.group_rank, self.group_size = group_rank, group_size
        self.parallel, self.optimizers, self.loader, self.state, self.guard = parallel, optimizers, loader, state, guard
        self.checkpoints, self.metrics, self.started_at = checkpoints, metrics, started_at
        self.manager = None
        self.store = None  # a store of our own when no torchrun hosts one
        self.participants = 0
        self.committed = True
        self.received_from: int | None = None  # set by load_state_dict: the group our state came from

    # -- the Manager ---------------------------------------------------------------------
    def start(self) -> None:
        """Join the replica groups, from the step this process resumed at. Called just before
        the first step: the Lighthouse waits for a group it has heard from, so a group that
        announced itself before building its model would hold the others back meanwhile."""
        # torchft logs every quorum and commit at INFO; RUST_LOG=info brings them back.
        os.environ.setdefault("RUST_LOG", "warn")
        from torchft._torchft import LighthouseClient
        from torchft.manager import Manager
        from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

        if self.group_rank == 0:  # the rank that talks to the Lighthouse: a wrong address is a config error
            # Reaching it is a start-up phase (launchers start it beside the groups): bounded by
            # fault.startup_timeout_s like joining the process group.
            bound_s = self.cfg.fault.startup_timeout_s or 86400.0
            try:
                LighthouseClient(self.lighthouse, connect_timeout=timedelta(seconds=bound_s))
            except RuntimeError:
                raise ConfigError(f"cannot reach the torchft Lighthouse at {self.lighthouse} within "
                                  f"fault.startup_timeout_s={bound_s:g} s; start it (python -m gigatrain lighthouse) "
                                  f"or fix fault.lighthouse / {LIGHTHOUSE_ENV}") from None

        timeout = timedelta(seconds=max(60.0, self.cfg.fault.watchdog_s / 2 or 60.0))
        pg = ProcessGroupNCCL(timeout=timeout) if torch.cuda.is_available() else ProcessGroupGloo(timeout=timeout)
        if "MASTER_ADDR" in os.environ:  # torchrun hosts the group's store
            store_addr, store_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        else:  # one plain process: the Manager's address is published in a store of its own
            self.store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
            store_addr, store_port = "localhost", self.store.port
        # Synchronous quorum: a rejoining group takes the live state before its forward pass,
        # so it contributes to the very step it rejoins at. init_sync off: every group draws the
        # same initial weights from train.seed.
        self.manager = Manager(pg=pg, load_state_dict=self.load_state_dict, state_dict=self.state_dict,
                               min_replica_size=self.cfg.fault.min_replicas, use_async_quorum=False,
                               timeout=timeout, quorum_timeout=timeout, connect_timeout=timeout,
                               rank=self.group_rank, world_size=self.group_size, store_addr=store_addr,
                               store_port=store_port, lighthouse_addr=self.lighthouse,
                               replica_id=f"replica{self.replica_id}", init_sync=False,
                               checkpoint_transport=_tensors_only_transport(timeout))
        self.manager.load_state_dict({"step": self.state.step, "batches_committed": 0})

    def close(self) -> None:
        if self.manager is not None:
            self.manager.shutdown(wait=False)
            self.manager = None

    # -- each step ---------------------------------------------------------------------
    def start_step(self) -> int:
        """Join this step's quorum (and, if this group is behind, load a healthy group's state
        before the forward pass); returns the groups taking part."""
        self.manager.start_quorum()
        self.participants = self.manager.num_participants()
        if self.state.step == 0:
            # A new run starts with all its groups: the ones launched first wait for the others
            # (about FIRST_QUORUM_WAIT_S at most) rather than train step 1 alone and hand their
            # state to each late one. Counted in tries, not read off a clock, so that every rank
            # of the group asks for the same number of quorums.
            for _ in range(int(FIRST_QUORUM_WAIT_S / 0.1)):
                if self.participants >= self.cfg.fault.replica_groups:
                    break
                time.sleep(0.1)
                self.manager.start_quorum()
                self.participants = self.manager.num_participants()
        if self.received_from is not None:
            self.checkpoints.loaded_from = "replica"
            self.metrics.event({"event": "rejoin", "step": self.state.step, "source_replica": self.received_from,
                                "replicas": self.participants, "seconds_from_start": time.time() - self.started_at})
            self.metrics.message(f"rejoined the replica groups at step {self.state.step} with replica "
                                 f"{self.received_from}'s live state ({self.participants} groups)")
            self.received_from = None
        return self.participants

    def average(self, loss: torch.Tensor) -> torch.Tensor:
        """Average this rank's gradient shards, and the group's loss, over the groups taking
        part (one flat buffer per dtype, one allreduce each); returns the averaged loss. A
        parameter without a gradient counts as zero, so that every group sends the same buffer."""
        params = self.parallel.parameters()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [_local(p.grad) for p in params]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        works, buffers = [], []
        for dtype, group in by_dtype.items():
            flat = torch.cat([g.reshape(-1) for g in group] + ([loss.detach().reshape(1).to(dtype)]
                                                               if dtype == loss.dtype else []))
            buffers.append((flat, group, dtype == loss.dtype))
            works.append(self.manager.allreduce(flat))
        if loss.dtype not in by_dtype:
            flat = loss.detach().reshape(1).clone()
            buffers.append((flat, [], True))
            works.append(self.manager.allreduce(flat))
        for work in works:
            work.wait()
        averaged = loss
        for flat, group, holds_loss in buffers:
            offset = 0
            for grad in group:
                grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
                offset += grad.numel()
            if holds_loss:
                averaged = flat[offset].to(loss.dtype)
        return averaged

    def should_commit(self) -> bool:
        """Whether every rank of every group in the quorum finished the step without error:
        only then is the update applied (otherwise the step is tried again on the next batch)."""
        self.committed = self.manager.should_commit()
        return self.committed

    # -- the live state a rejoining group receives -------------------------------------------
    def state_dict(self) -> dict:
        """This rank's shard of everything that continues training: weights, optimizer state,
        step, data position, schedule, and the guard's recent losses (its skip decisions must
        match the other groups')."""
        s = self.state
        return {"replica": self.replica_id, "step": s.step, "train_time_s": s.train_time_s,
                "schedule_steps": s.schedule_steps, "loader": dict(self.loader.state_dict()),
                "guard": {"recent": list(self.guard.recent), "consecutive": self.guard.consecutive},
                "model": [_to_local(part.state_dict()) for part in self.parallel.parts],
                "optimizers": [_to_local(optimizer.state_dict()) for optimizer in self.optimizers]}

    @torch.no_grad()
    def load_state_dict(self, received: dict) -> None:
        for part, tensors in zip(self.parallel.parts, received["model"], strict=True):
            own = part.state_dict()
            if own.keys() != tensors.keys():
                raise RuntimeError(f"replica {received['replica']} sent other weights than this model holds")
            for name, tensor in own.items():
                _local(tensor).copy_(tensors[name])
        for optimizer, saved in zip(self.optimizers, received["optimizers"], strict=True):
            optimizer.load_state_dict(self._as_sharded(optimizer, saved))
        s = self.state
        s.step, s.train_time_s, s.schedule_steps = received["step"], received["train_time_s"], received["schedule_steps"]
        self.loader.load_state_dict(received["loader"])
        self.guard.recent.clear()
        self.guard.recent.extend(received["guard"]["recent"])
        self.guard.consecutive = received["guard"]["consecutive"]
        self.received_from = received["replica"]

    @staticmethod
    def _as_sharded(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
        """The received optimizer state with each shard wrapped back into its parameter's DTensor
        (a fresh optimizer has no state to copy into)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {}
        for index, values in saved["state"].items():
            param = params[int(index)]
            if hasattr(param, "device_mesh"):
                from torch.distributed.tensor import DTensor
                local_shape = param.to_local().shape
                values = {key: DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                                  shape=param.shape, stride=param.stride())
                          if isinstance(value, torch.Tensor) and value.shape == local_shape else value
                          for key, value in values.items()}
            state[index] = values
        return {"state": state, "param_groups": saved["param_groups"]}


def serve_lighthouse(bind: str, min_replicas: int, join_timeout_ms: int, quorum_tick_ms: int,
                     heartbeat_timeout_ms: int) -> int:
    """`gigatrain lighthouse`: torchft's Lighthouse in this process until SIGINT or SIGTERM
    (the `torchft_lighthouse` binary's server, without needing its path)."""
    import signal
    import threading

    if importlib.util.find_spec("torchft") is None:
        raise ConfigError("the Lighthouse is torchft's, which is not installed; pip install 'gigatrain[ft]' (torchft==0.2.0)")
    from torchft._torchft import LighthouseServer

    try:
        server = LighthouseServer(bind=bind, min_replicas=min_replicas, join_timeout_ms=join_timeout_ms,
                                  quorum_tick_ms=quorum_tick_ms, heartbeat_timeout_ms=heartbeat_timeout_ms)
    except Exception as err:  # a taken port, a bad address: the library's own words
        raise ConfigError(f"the Lighthouse cannot serve on --bind {bind}: {err}") from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"torchft Lighthouse at {server.address()} (min_replicas {min_replicas}); start each replica group with "
          f"{LIGHTHOUSE_ENV}={server.address()}", flush=True)
    while not stop.wait(1.0):  # a timed wait, so that the signal handler gets to run
        pass
    server.shutdown()
    return 0
