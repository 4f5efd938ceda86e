"""The checkpointing component alone, on a small plain model: when it saves, what a checkpoint
costs the time budget, and resume and rollback restoring through the same code."""

import pytest
import torch

from gigatrain.config import ConfigError, load_config
from gigatrain.rundir import RunDir
from gigatrain.train.checkpointing import ASSUMED_WRITE_BYTES_PER_S, CheckpointManager, TrainState, identity_differences
from gigatrain.train.memory import ranks_per_host

IDENTITY = {"model": {"d_model": 4}, "tokenizer": {"kind": "byte", "vocab_size": 256, "sha256": "ab" * 32},
            "data": {"sha256": "cd" * 32, "path": "/data/a"}}


class OneLayer:
    """What the manager needs of a parallelized model: its parts and their parameters."""

    def __init__(self):
        torch.manual_seed(0)
        self.parts = [torch.nn.Linear(4, 4)]

    def parameters(self):
        return self.parts[0].parameters()


class Position:
    """A data loader's position, as the manager saves and restores it."""

    def __init__(self):
        self.batches = 0

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]


def manager(run_dir, *overrides, events=None):
    cfg = load_config(None, [f"--run.dir={run_dir}", "--train.async_checkpoint=false", *overrides])
    parallel = OneLayer()
    optimizers = [torch.optim.AdamW(parallel.parts[0].parameters(), lr=0.1)]
    m = CheckpointManager(cfg, RunDir(run_dir), parallel, optimizers, Position(), TrainState(schedule_steps=10),
                          model_args=None, data=None, layout={"dp_shard": 1}, tokens_per_step=64, faults=None,
                          event=(events if events is not None else []).append, is_main=True)
    m.identity = IDENTITY  # what a run's model and data would give
    return m


def train_a_step(m):
    sum(p.square().sum() for p in m.parallel.parameters()).backward()
    m.optimizers[0].step()
    m.optimizers[0].zero_grad()
    m.state.step += 1
    m.loader.batches += 1


def test_saves_every_checkpoint_every_steps(tmp_path):
    m = manager(tmp_path, "--train.checkpoint_every=4")
    assert [step for step in range(1, 13) if m.due(step)] == [4, 8, 12]


def test_the_first_measured_cost_replaces_the_assumption_then_the_longest_counts(tmp_path):
    events = []
    m = manager(tmp_path, events=events)
    weights = (4 * 4 + 4) * 4  # bytes of fp32 weight and bias
    assert m.cost_s == pytest.approx(1.0 + 3 * weights / ASSUMED_WRITE_BYTES_PER_S) and not m.cost_measured
    m.on_checkpoint_event({"event": "checkpoint", "write_s": 0.25})
    assert m.cost_s == 0.25 and m.cost_measured  # lower than the assumption, and measured
    m.on_checkpoint_event({"event": "checkpoint", "write_s": 0.5})
    m.on_checkpoint_event({"event": "checkpoint", "write_s": 0.3})
    assert m.cost_s == 0.5
    m.on_checkpoint_event({"event": "checkpoint_failed", "step": 3})
    assert m.cost_s == 0.5 and len(events) == 4  # every event is passed on


def test_resume_and_rollback_restore_the_same_way_but_the_data_goes_on_after_a_rollback(tmp_path):
    m = manager(tmp_path)
    for _ in range(4):
        train_a_step(m)
    m.state.train_time_s = 4.0
    m.final_checkpoint()
    saved = m.parallel.parts[0].weight.detach().clone()
    for _ in range(3):
        train_a_step(m)
    assert not torch.equal(m.parallel.parts[0].weight, saved)

    restored = m.roll_back()
    assert restored["step"] == 4 and restored["tokens_seen"] == 4 * 64 and restored["identity"] == IDENTITY
    assert (m.state.step, m.state.train_time_s) == (4, 4.0)
    assert torch.equal(m.parallel.parts[0].weight, saved)
    assert m.loader.batches == 7  # past the window that failed

    fresh = manager(tmp_path)
    assert fresh.resume()
    assert (fresh.state.step, fresh.state.train_time_s) == (4, 4.0) and fresh.loader.batches == 4
    assert torch.equal(fresh.parallel.parts[0].weight, saved)
    m.close(), fresh.close()


def test_nothing_to_restore_in_a_new_run(tmp_path):
    m = manager(tmp_path)
    assert not m.resume() and m.roll_back() is None and m.state.step == 0


def test_a_checkpoint_of_another_model_is_refused_before_loading(tmp_path):
    m = manager(tmp_path)
    train_a_step(m)
    m.final_checkpoint()
    other = manager(tmp_path)
    other.identity = {**IDENTITY, "model": {"d_model": 8}}
    with pytest.raises(Exception, match=r"cannot resume .* the model differs \(model.d_model 4 -> 8\)"):
        other.resume()


def test_identity_differences_name_each_fix():
    assert identity_differences(IDENTITY, IDENTITY, allow_data_change=False) == []
    other_data = {**IDENTITY, "data": {"sha256": "ef" * 32, "path": "/data/b"}}
    difference, = identity_differences(IDENTITY, other_data, allow_data_change=False)
    assert difference.startswith("the data differs (/data/a -> /data/b, other shards)")
    assert identity_differences(IDENTITY, other_data, allow_data_change=True) == []
    other_tokenizer = {**IDENTITY, "tokenizer": {"kind": "bpe", "vocab_size": 512, "sha256": "00" * 32}}
    difference, = identity_differences(IDENTITY, other_tokenizer, allow_data_change=True)
    assert "a run cannot change its tokenizer" in difference


def test_a_model_field_newer_than_the_checkpoint_is_its_default_and_no_data_means_any_data():
    """A checkpoint saved before the rotary-scaling fields existed resumes; an imported model
    (its identity's data None: it has seen none) continues on whatever data it is given."""
    before = {**IDENTITY, "model": {"d_model": 4}}
    now = {**IDENTITY, "model": {"d_model": 4, "rope_scaling_factor": 1.0, "rope_original_max_seq_len": 8192}}
    assert identity_differences(before, now, allow_data_change=False) == []
    scaled = {**IDENTITY, "model": {"d_model": 4, "rope_scaling_factor": 8.0}}
    difference, = identity_differences(before, scaled, allow_data_change=False)
    assert "model.rope_scaling_factor 1.0 -> 8.0" in difference
    assert identity_differences({**IDENTITY, "data": None}, IDENTITY, allow_data_change=False) == []


def memory_manager(run_dir, memory_dir, events=None):
    return manager(run_dir, "--fault.recovery=memory", "--fault.memory_every=2", "--train.checkpoint_every=4",
                   f"--fault.memory_dir={memory_dir}", events=events)


def test_memory_mode_copies_every_memory_every_steps_and_resumes_from_the_newer_state(tmp_path):
    """In-memory copies at steps 2, 4, 6 (and a storage checkpoint at 4): a resume loads the
    copy of step 6; a rollback to step 4 drops the copy of step 6 (its steps were abandoned);
    a copy as new as the storage checkpoint is loaded, an older one is not; the finished run
    leaves no copies behind."""
    events, memory_dir = [], tmp_path / "shm"
    m = memory_manager(tmp_path / "run", memory_dir, events)
    assert [step for step in range(1, 9) if m.due(step)] == [2, 4, 6, 8]
    for _ in range(6):
        train_a_step(m)
        if m.due(m.state.step):
            assert m.save() >= 0
    m.checkpointer.wait()
    assert m.memory.wait()  # the last copy is written in the background
    saved = m.parallel.parts[0].weight.detach().clone()
    copies = [e for e in events if e["event"] == "memory_checkpoint"]
    assert [e["step"] for e in copies] == [2, 4, 6] and all(e["stall_s"] >= 0 for e in copies)
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [4]

    fresh = memory_manager(tmp_path / "run", memory_dir, events)
    assert fresh.resume() and fresh.loaded_from == "memory"
    assert (fresh.state.step, fresh.loader.batches) == (6, 6)
    assert torch.equal(fresh.parallel.parts[0].weight, saved)
    restore, = [e for e in events if e["event"] == "memory_restore"]
    assert (restore["step"], restore["loaded_from"], restore["from_peer"]) == (6, "memory", [])

    assert m.roll_back()["step"] == 4
    assert [s for s, _, _ in m.memory.store.files()] == [4]
    again = memory_manager(tmp_path / "run", memory_dir, events)
    assert again.resume() and (again.loaded_from, again.state.step) == ("memory", 4)

    train_a_step(again)
    again.final_checkpoint()  # storage at step 5: newer than the copy
    last = memory_manager(tmp_path / "run", memory_dir, events)
    assert last.resume() and (last.loaded_from, last.state.step) == ("storage", 5)
    fallback, = [e for e in events if e["event"] == "memory_fallback"]
    assert fallback["reason"] == "the storage checkpoint (step 5) is newer than the newest copy in memory (step 4)"
    last.finish(trained=False)
    assert not any(memory_dir.iterdir())
    for each in (m, fresh, again, last):
        each.close()


def test_ranks_per_host_must_divide_the_world():
    assert ranks_per_host(2, 8) == 2
    with pytest.raises(ConfigError, match=r"fault.ranks_per_host=3 does not divide the 8 processes"):
        ranks_per_host(3, 8)
