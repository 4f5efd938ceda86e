"""TokenData verification, TokenSplit reads, BatchLoader order/resume/sharding, eval_batches."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gigatrain.data import BatchLoader, DataError, TokenData, TokenSplit, eval_batches
from gigatrain.data.prepare import prepare


def make_split(num_tokens: int, cuts: list[int] = (), name: str = "train") -> TokenSplit:
    """Token i has value i (so a window shows where it starts), cut into shards at `cuts`."""
    tokens = np.arange(num_tokens, dtype=np.int64)
    return TokenSplit(name, np.split(tokens, sorted(cuts)), num_bytes=3 * num_tokens)


@pytest.fixture()
def prepared(tmp_path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(f"document number {i} — ünïcode 😀 " * (5 + i % 7))
    prepare([str(corpus)], tmp_path / "data", tokenizer="byte", val_fraction=0.2, shard_tokens=1000)
    return tmp_path / "data"


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_token_data_reads_what_prepare_wrote(prepared):
    data = TokenData(prepared)
    manifest = manifest_of(prepared)
    assert data.vocab_size == 256 and data.tokenizer.kind == "byte" and data.eot_id == 0
    for name in ("train", "val"):
        split = data.split(name)
        files = [prepared / shard["file"] for shard in manifest["splits"][name]["shards"]]
        on_disk = np.concatenate([np.fromfile(file, dtype="<u2") for file in files]).astype(np.int64)
        assert split.num_tokens == manifest["splits"][name]["tokens"] == len(on_disk)
        assert split.bytes_per_token == manifest["splits"][name]["bytes"] / split.num_tokens
        assert np.array_equal(split.read(0, split.num_tokens), on_disk)
        assert np.array_equal(split.read(990, 1010), on_disk[990:1010])  # across a shard boundary
        assert split.read(5, 5).dtype == np.int64 and len(split.read(5, 5)) == 0
    assert len(manifest["splits"]["train"]["shards"]) > 2
    assert isinstance(data.split("train").shards[0], np.memmap)
    with pytest.raises(DataError, match="no 'test' split"):
        data.split("test")


def shard_path(folder: Path) -> Path:
    return folder / manifest_of(folder)["splits"]["train"]["shards"][1]["file"]


def test_corrupted_shard_is_named(prepared):
    path = shard_path(prepared)
    data = bytearray(path.read_bytes())
    data[7] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{path.name} is corrupted.*prepare"):
        TokenData(prepared)
    TokenData(prepared, verify=False)  # opening without verification still works


def test_truncated_shard_is_named(prepared):
    path = shard_path(prepared)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=rf"{path.name} has \d+ bytes, expected"):
        TokenData(prepared, verify=False)  # size is checked even without verify


def test_missing_shard_is_named(prepared):
    path = shard_path(prepared)
    path.unlink()
    with pytest.raises(DataError, match=rf"{path.name} is missing"):
        TokenData(prepared)


def test_token_outside_vocabulary_is_named(prepared):
    path = shard_path(prepared)
    tokens = np.fromfile(path, dtype="<u2")
    tokens[3] = 300  # the byte tokenizer has 256 ids
    tokens.tofile(path)
    manifest = manifest_of(prepared)
    manifest["splits"]["train"]["shards"][1]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"{path.name} holds token id 300, outside the vocabulary of 256"):
        TokenData(prepared)


def test_missing_or_bad_manifest(tmp_path, prepared):
    with pytest.raises(DataError, match=r"manifest\.json not found.*gigatrain prepare"):
        TokenData(tmp_path / "nothing")
    (prepared / "manifest.json").write_text("{broken")
    with pytest.raises(DataError, match=r"manifest\.json is not valid JSON"):
        TokenData(prepared)
    (prepared / "manifest.json").write_text(json.dumps({"format": "gigatrain-tokens", "version": 1}))
    with pytest.raises(DataError, match=r"manifest\.json is malformed"):
        TokenData(prepared)


def test_windows_cross_shards_correctly():
    split = make_split(100, cuts=[10, 11, 50])
    starts = np.array([0, 5, 9, 10, 45, 89, 48])
    assert np.array_equal(split.windows(starts, 11), starts[:, None] + np.arange(11))
    with pytest.raises(IndexError):
        split.windows(np.array([90]), 11)


def collect(loader: BatchLoader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(count)]


def test_batches_are_deterministic_shifted_int64(prepared):
    split = TokenData(prepared).split("train")
    first = collect(BatchLoader(split, seq_len=16, global_batch=4, seed=1), 5)
    second = collect(BatchLoader(split, seq_len=16, global_batch=4, seed=1), 5)
    other_seed = collect(BatchLoader(split, seq_len=16, global_batch=4, seed=2), 5)
    for (x, y), (x2, y2) in zip(first, second):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])
    stream = split.read(0, split.num_tokens).tolist()
    windows = {tuple(stream[k * 16 : k * 16 + 17]) for k in range((split.num_tokens - 1) // 16)}
    for x, y in first:  # each row is a window of the stream starting at a multiple of seq_len
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert tuple(row_x + row_y[-1:]) in windows
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other_seed))


def test_windows_and_epochs_follow_the_documented_order():
    split = make_split(1000)
    loader = BatchLoader(split, seq_len=10, global_batch=8, seed=5)
    assert loader.num_windows == 99 and loader.batches_per_epoch == 12  # 99 // 8; 3 windows skipped
    for epoch in range(2):
        order = np.random.Generator(np.random.PCG64([5, epoch])).permutation(99)
        for batch in range(12):
            x, y = loader.next_batch()
            starts = order[batch * 8 : (batch + 1) * 8] * 10
            assert x[:, 0].tolist() == starts.tolist()
            assert torch.equal(x, torch.from_numpy(starts[:, None] + np.arange(10)))
            assert torch.equal(y, x + 1)
    assert loader.state_dict()["epoch"] == 2
    sequential = BatchLoader(split, seq_len=10, global_batch=8, seed=5, shuffle=False)
    assert sequential.next_batch()[0][:, 0].tolist() == list(range(0, 80, 10))


def test_state_dict_resumes_mid_epoch_and_across_epochs(prepared):
    split = TokenData(prepared).split("train")
    reference = BatchLoader(split, seq_len=32, global_batch=6, seed=3)
    per_epoch = reference.batches_per_epoch
    expected = collect(reference, 2 * per_epoch + 3)
    for stop in (1, per_epoch - 1, per_epoch, per_epoch + 2):
        original = BatchLoader(split, seq_len=32, global_batch=6, seed=3)
        collect(original, stop)
        state = json.loads(json.dumps(original.state_dict()))  # as a checkpoint would store it
        assert all(type(value) is int for value in state.values())
        resumed = BatchLoader(split, seq_len=32, global_batch=6, seed=999)  # the state's seed wins
        resumed.load_state_dict(state)
        for (x, y), (x2, y2) in zip(expected[stop:], collect(resumed, len(expected) - stop)):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_resume_with_other_batch_shape_is_refused(prepared):
    split = TokenData(prepared).split("train")
    state = BatchLoader(split, seq_len=32, global_batch=6, seed=3).state_dict()
    with pytest.raises(DataError, match="global_batch 6 -> 4"):
        BatchLoader(split, seq_len=32, global_batch=4, seed=3).load_state_dict(state)


def test_ranks_concatenate_to_the_single_process_batch(prepared):
    split = TokenData(prepared).split("train")
    single = collect(BatchLoader(split, seq_len=16, global_batch=8, seed=4), 30)
    for world_size in (2, 4):
        ranks = [collect(BatchLoader(split, 16, 8, seed=4, rank=r, world_size=world_size), 30) for r in range(world_size)]
        for step, (x, y) in enumerate(single):
            assert torch.equal(torch.cat([rank[step][0] for rank in ranks]), x)
            assert torch.equal(torch.cat([rank[step][1] for rank in ranks]), y)
    with pytest.raises(ValueError, match="not divisible"):
        BatchLoader(split, 16, 6, seed=0, world_size=4)


def test_too_little_data_says_how_much(prepared):
    split = TokenData(prepared).split("val")
    with pytest.raises(DataError, match=rf"val split has {split.num_tokens} tokens; 64 sequence\(s\) of 512 need 32769"):
        BatchLoader(split, seq_len=512, global_batch=64, seed=0)


def test_eval_batches_cover_the_split_in_order():
    split = make_split(95, cuts=[40], name="val")
    batches = list(eval_batches(split, seq_len=10, batch_size=4))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 1]  # 9 windows, last batch partial
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    assert torch.equal(inputs.flatten(), torch.arange(90))
    assert torch.equal(targets.flatten(), torch.arange(1, 91))  # each token a target once
    assert len(list(eval_batches(split, 10, 4, max_batches=2))) == 2
    by_rank = [list(eval_batches(split, 10, 4, rank=r, world_size=2)) for r in range(2)]
    assert [len(b) for b in by_rank] == [2, 1]
    assert torch.equal(by_rank[1][0][0], batches[1][0])
    with pytest.raises(DataError, match="need 101"):
        list(eval_batches(split, seq_len=100, batch_size=1))


@settings(max_examples=25, deadline=None)
@given(
    num_tokens=st.integers(20, 400),
    cut_fractions=st.lists(st.floats(0.01, 0.99), max_size=3),
    seq_len=st.integers(1, 12),
    local_batch=st.integers(1, 3),
    world_size=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**32),
    steps=st.integers(0, 12),
    shuffle=st.booleans(),
)
def test_loader_properties(num_tokens, cut_fractions, seq_len, local_batch, world_size, seed, steps, shuffle):
    """For any data and batch shape: windows are the documented ones, ranks tile the
    global batch, an epoch visits distinct windows, and resuming from any step is exact."""
    split = make_split(num_tokens, cuts=[int(f * num_tokens) for f in cut_fractions])
    global_batch = local_batch * world_size
    num_windows = (num_tokens - 1) // seq_len
    if num_windows < global_batch:
        with pytest.raises(DataError):
            BatchLoader(split, seq_len, global_batch, seed=seed, shuffle=shuffle)
        return
    make = lambda rank=0, size=1: BatchLoader(split, seq_len, global_batch, seed=seed, rank=rank, world_size=size, shuffle=shuffle)  # noqa: E731
    single = make()
    per_epoch = single.batches_per_epoch
    batches = collect(single, per_epoch + 2)
    ranks = [collect(make(rank, world_size), per_epoch + 2) for rank in range(world_size)]
    seen = []
    for step, (x, y) in enumerate(batches):
        starts = x[:, 0]
        assert torch.equal(x, starts[:, None] + torch.arange(seq_len)) and torch.equal(y, x + 1)
        assert torch.all(starts % seq_len == 0) and torch.all(starts + seq_len < num_tokens)
        assert torch.equal(torch.cat([rank[step][0] for rank in ranks]), x)
        if step < per_epoch:
            seen += starts.tolist()
    assert len(set(seen)) == len(seen) == per_epoch * global_batch
    resumed = make()
    original = make()
    collect(original, steps)
    resumed.load_state_dict(original.state_dict())
    for (x, _), (x2, _) in zip(collect(original, 3), collect(resumed, 3)):
        assert torch.equal(x, x2)
