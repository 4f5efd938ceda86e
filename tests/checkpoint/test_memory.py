"""In-memory checkpoints' files in one process: an exact round trip, which copies a resume may
use, what is refused, and that only our own files are ever deleted. (The exchange with a peer
host runs in tests/fault/test_memory.py, under torchrun.)"""

import json
import pickle
import struct

import pytest
import torch

from helpers import model_and_optimizer
from gigatrain.checkpoint.dcp import CheckpointError
from gigatrain.checkpoint.memory import KEEP, MAGIC, Hosts, MemoryStore, file_name, layout_tag, parse_name

TAG = layout_tag(1, 1, {"dp_shard": 1})


def store(tmp_path, run="run-a", tag=TAG, events=None):
    """One process's store, writing in the foreground (the background thread runs under torchrun)."""
    on_event = events.append if events is not None else None
    return MemoryStore(tmp_path / run, run, Hosts(rank=0, world=1, per_host=1), tag, on_event=on_event, background=False)


def state_of(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()})


def test_a_copy_loads_back_bit_exact_weights_optimizer_rng_and_trainer_state(tmp_path):
    model, optimizer = model_and_optimizer(seed=1)
    torch.manual_seed(5)
    events = []
    copies = store(tmp_path, events=events)
    assert copies.save(3, [model], [optimizer], {"step": 3, "loader": {"batches": 3}}) > 0
    event, = events
    assert event["event"] == "memory_checkpoint" and event["step"] == 3 and event["bytes"] > 0
    assert set(event) == {"event", "step", "stall_s", "bytes", "write_s", "peer_s"}
    saved, rng = state_of(model, optimizer), torch.get_rng_state()

    other, other_optimizer = model_and_optimizer(seed=2)  # another process, after a restart
    torch.manual_seed(6)
    step, foreign, own = copies.newest_complete()
    assert (step, foreign, own) == (3, False, [True])
    restored = copies.load(step, own, [other], [other_optimizer])
    assert restored.trainer_state == {"step": 3, "loader": {"batches": 3}} and restored.loaded_from == "memory"
    weights, moments = state_of(other, other_optimizer)
    assert all(torch.equal(weights[k], saved[0][k]) for k in saved[0])
    assert all(torch.equal(moments[i][k], saved[1][i][k]) for i in saved[1] for k in saved[1][i])
    assert torch.equal(torch.get_rng_state(), rng)


def test_each_copy_holds_the_state_at_its_step_when_tensors_change_in_place_or_are_replaced(tmp_path):
    """A store reuses the names of the state's tensors from copy to copy (StateTensors): a copy
    after more training steps (in-place updates) and after an optimizer's state tensor is
    replaced by a new one must hold those values, not the last copy's."""
    model, optimizer = model_and_optimizer(seed=1)
    copies = store(tmp_path)
    copies.save(1, [model], [optimizer], {"step": 1})
    model(torch.zeros(2, 8, dtype=torch.long)).sum().backward()
    optimizer.step()  # in place: weights and moments change, the tensors stay the same objects
    first = next(iter(optimizer.state.values()))
    first["exp_avg"] = first["exp_avg"] + 1.0  # a new tensor where the last copy's was
    copies.save(2, [model], [optimizer], {"step": 2})
    saved = state_of(model, optimizer)

    other, other_optimizer = model_and_optimizer(seed=2)
    copies.load(2, [True], [other], [other_optimizer])
    weights, moments = state_of(other, other_optimizer)
    assert all(torch.equal(weights[k], saved[0][k]) for k in saved[0])
    assert all(torch.equal(moments[i][k], saved[1][i][k]) for i in saved[1] for k in saved[1][i])


def test_keeps_the_newest_steps_and_picks_the_newest(tmp_path):
    model, optimizer = model_and_optimizer(seed=1)
    copies = store(tmp_path)
    for step in (2, 4, 6):
        copies.save(step, [model], [optimizer], {"step": step})
    assert sorted(s for s, _, _ in copies.files()) == [4, 6][-KEEP:]
    assert copies.newest_complete()[0] == 6


def test_copies_of_another_layout_are_seen_but_never_loaded(tmp_path):
    model, optimizer = model_and_optimizer(seed=1)
    store(tmp_path, tag=layout_tag(1, 1, {"dp_shard": 2})).save(4, [model], [optimizer], {"step": 4})
    step, foreign, _ = store(tmp_path).newest_complete()
    assert step is None and foreign


@pytest.mark.parametrize("tamper", ["other_run", "renamed_step", "pickle", "truncated", "bad_entry", "other_model"])
def test_a_copy_that_is_not_this_ranks_state_is_refused(tmp_path, tamper):
    model, optimizer = model_and_optimizer(seed=1)
    copies = store(tmp_path)
    copies.save(4, [model], [optimizer], {"step": 4})
    path = copies.folder / file_name(4, 0, TAG)
    if tamper == "other_run":  # another run's folder holds it under the same name
        store(tmp_path, run="run-b").save(4, [model], [optimizer], {"step": 4})
        path.write_bytes((tmp_path / "run-b" / "host0" / file_name(4, 0, TAG)).read_bytes())
        expected = "its run is 'run-b', not 'run-a'"
    elif tamper == "renamed_step":
        path.rename(copies.folder / file_name(8, 0, TAG))
        expected = "its step is 4, not 8"
    elif tamper == "pickle":  # what a torch.save file would be: nothing is unpickled
        path.write_bytes(pickle.dumps(print))
        expected = "is not an in-memory checkpoint"
    elif tamper == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
        expected = "its header says .* \\(truncated\\?\\)"
    elif tamper == "bad_entry":  # a tensor said to lie beyond the data
        raw = path.read_bytes()
        data_size, header_size = struct.unpack("<QQ", raw[len(MAGIC):len(MAGIC) + 16])
        header = json.loads(raw[len(MAGIC) + 16 + data_size:])
        header["tensors"][0]["offset"] = data_size
        new = json.dumps(header).encode()
        path.write_bytes(raw[:len(MAGIC)] + struct.pack("<QQ", data_size, len(new)) + raw[len(MAGIC) + 16:][:data_size] + new)
        expected = "has a malformed tensor entry"
    else:
        bigger = torch.nn.Linear(4, 4)
        store(tmp_path).save(4, [bigger], [torch.optim.AdamW(bigger.parameters())], {"step": 4})
        expected = "other tensors than this model's"
    fresh, fresh_optimizer = model_and_optimizer(seed=2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    step, _, own = copies.newest_complete()
    with pytest.raises(CheckpointError, match=expected):
        copies.load(step, own, [fresh], [fresh_optimizer])
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # nothing was loaded


def test_clear_removes_our_files_only(tmp_path):
    model, optimizer = model_and_optimizer(seed=1)
    copies = store(tmp_path)
    copies.save(2, [model], [optimizer], {"step": 2})
    copies.save(4, [model], [optimizer], {"step": 4})
    copies.discard_after(2)
    assert [s for s, _, _ in copies.files()] == [2]
    (copies.folder / "notes.txt").write_text("not ours")
    copies.clear()
    assert sorted(p.name for p in copies.folder.iterdir()) == ["notes.txt"]
    (copies.folder / "notes.txt").unlink()
    copies.clear()
    assert not (tmp_path / "run-a").exists()


def test_hosts_and_peers():
    two_hosts = [Hosts(rank, 8, 4) for rank in range(8)]
    assert [h.host() for h in two_hosts] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [h.peer() for h in two_hosts] == [4, 5, 6, 7, 0, 1, 2, 3]
    three_hosts = [Hosts(rank, 6, 2) for rank in range(6)]
    assert [h.peer() for h in three_hosts] == [2, 3, 4, 5, 0, 1]
    assert [h.ward for h in three_hosts] == [4, 5, 0, 1, 2, 3]
    assert Hosts(1, 4, 4).peer() is None and Hosts(1, 4, 4).ward is None  # one host: nowhere else to keep a copy
    assert parse_name(file_name(12, 3, TAG)) == (12, 3, TAG) and parse_name("step_1.pt") is None

