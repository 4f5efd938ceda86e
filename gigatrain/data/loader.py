"""Reading prepared data: TokenData (verified, memory-mapped shards) and the batch loaders.

Windows: a split's token stream is cut into windows of seq_len + 1 tokens starting
at k * seq_len, for k = 0 .. num_windows - 1 (neighbours share one token: the last
target of one window is the first input of the next). A window gives inputs
tokens[:-1] and targets tokens[1:].

Training order (BatchLoader): epoch e visits the windows in the order of
`Generator(PCG64([seed, e])).permutation(num_windows)` (no permutation when
shuffle=False). Global batch i of the epoch is windows [i * global_batch,
(i + 1) * global_batch) of that order; the num_windows % global_batch left over
are skipped, so a batch never straddles two epochs (the permutation changes which
ones). Rank r takes the r-th contiguous slice of global_batch // world_size windows
of every global batch, so the global batches are the same whatever the world size.
Everything is a function of (seed, epoch, batch index): the loader's state is
three ints, and resuming reproduces the batches exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gigatrain.data.errors import DataError
from gigatrain.data.prepare import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE
from gigatrain.data.tokenizers import Tokenizer, load_tokenizer
from gigatrain.paths import sha256_file

DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class TokenSplit:
    """One split's token stream, spread over shards (memmaps or arrays), read by ranges."""

    def __init__(self, name: str, shards: list[np.ndarray], num_bytes: int = 0, num_documents: int = 0) -> None:
        self.name = name
        self.shards = shards
        self.shard_files: list[str] = [f"{name} shard {i}" for i in range(len(shards))]  # for messages
        # Shard i holds tokens [shard_starts[i], shard_starts[i + 1]) of the stream.
        self.shard_starts = np.cumsum([0] + [len(shard) for shard in shards])
        self.num_tokens = int(self.shard_starts[-1])
        self.num_bytes = num_bytes
        self.num_documents = num_documents

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token, to turn loss in nats/token into bits per byte."""
        return self.num_bytes / self.num_tokens if self.num_tokens else 0.0

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream, as int64."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) is outside split {self.name!r} of {self.num_tokens} tokens")
        parts = []
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        while start < stop:
            shard_start, shard_stop = int(self.shard_starts[shard]), int(self.shard_starts[shard + 1])
            end = min(stop, shard_stop)
            parts.append(self.shards[shard][start - shard_start : end - shard_start])
            start, shard = end, shard + 1
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int64 [len(starts), length]: row j is tokens [starts[j], starts[j] + length)."""
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((len(starts), length), dtype=np.int64)
        if len(starts) and (starts.min() < 0 or starts.max() + length > self.num_tokens):
            raise IndexError(f"a window of {length} tokens runs outside split {self.name!r} of {self.num_tokens} tokens")
        shard_of = np.searchsorted(self.shard_starts, starts, side="right") - 1
        inside = starts + length <= self.shard_starts[shard_of + 1]
        offsets = np.arange(length)
        # Windows inside one shard: one fancy-indexing gather per shard, no Python loop.
        for shard in np.unique(shard_of[inside]):
            rows = np.flatnonzero(inside & (shard_of == shard))
            local = starts[rows] - self.shard_starts[shard]
            out[rows] = self.shards[shard][local[:, None] + offsets]
        # The rare window that crosses a shard boundary.
        for row in np.flatnonzero(~inside):
            out[row] = self.read(int(starts[row]), int(starts[row]) + length)
        return out


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: {folder} is not prepared data; run `gigatrain prepare SOURCE... --out {folder}` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error}): run `gigatrain prepare ... --out {folder} --overwrite` again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{path} is not a gigatrain token manifest: run `gigatrain prepare ... --out {folder}` to make one")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {manifest.get('version')!r}, this gigatrain reads {FORMAT_VERSION}: re-run `gigatrain prepare`")
    return manifest


class TokenData:
    """A prepared data folder: manifest, tokenizer and one TokenSplit per split.

    Checks on open that every shard exists with the size its token count implies;
    with verify=True also its sha256 and that its ids are < vocab_size (reads all data once).
    """

    def __init__(self, path: Path, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        try:
            self.dtype = DTYPES[self.manifest["dtype"]]
            tokenizer_entry = self.manifest["tokenizer"]
            self.vocab_size: int = int(tokenizer_entry["vocab_size"])
            self.eot_id: int = int(tokenizer_entry["eot_id"])
            tokenizer_file = str(tokenizer_entry["file"])
            split_entries = dict(self.manifest["splits"])
            self.splits = {name: self._open_split(name, entry, verify) for name, entry in split_entries.items()}
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, DataError):
                raise
            manifest_path = self.path / MANIFEST_FILE
            raise DataError(f"{manifest_path} is malformed ({type(error).__name__}: {error}): re-run `gigatrain prepare`") from None
        self.tokenizer: Tokenizer = load_tokenizer(self._file(tokenizer_file))
        if (self.tokenizer.vocab_size, self.tokenizer.eot_id) != (self.vocab_size, self.eot_id):
            raise DataError(f"{self._file(tokenizer_file)} does not match {self.path / MANIFEST_FILE} (vocab size or eot id differ): re-run `gigatrain prepare`")
        if verify:
            self.check_token_range()

    def _file(self, name: str) -> Path:
        # Names in the manifest are plain file names inside the folder, never paths.
        if Path(name).name != name or name in ("", ".", ".."):
            raise DataError(f"{self.path / MANIFEST_FILE} names file {name!r} outside its folder: re-run `gigatrain prepare`")
        return self.path / name

    def _open_split(self, name: str, entry: dict, verify: bool) -> TokenSplit:
        shards, files = [], []
        for shard in entry["shards"]:
            file = self._file(shard["file"])
            tokens = int(shard["tokens"])
            self._check_shard(file, tokens, shard["sha256"] if verify else None)
            shards.append(np.memmap(file, dtype=self.dtype, mode="r") if tokens else np.empty(0, self.dtype))
            files.append(str(file))
        split = TokenSplit(name, shards, num_bytes=int(entry["bytes"]), num_documents=int(entry["documents"]))
        split.shard_files = files
        if split.num_tokens != int(entry["tokens"]):
            raise DataError(f"{self.path / MANIFEST_FILE}: split {name!r} says {entry['tokens']} tokens but its shards hold {split.num_tokens}: re-run `gigatrain prepare`")
        return split

    def _check_shard(self, file: Path, tokens: int, sha256: str | None) -> None:
        if not file.is_file():
            raise DataError(f"shard {file} is missing: re-run `gigatrain prepare ... --overwrite` to rebuild {self.path}")
        expected_bytes = tokens * self.dtype.itemsize
        actual_bytes = file.stat().st_size
        if actual_bytes != expected_bytes:
            raise DataError(f"shard {file} has {actual_bytes} bytes, expected {expected_bytes} ({tokens} tokens): it is truncated or damaged; re-run `gigatrain prepare ... --overwrite`")
        if sha256 is not None and sha256_file(file) != sha256:
            raise DataError(f"shard {file} is corrupted (sha256 differs from the manifest): re-run `gigatrain prepare ... --overwrite`")

    def check_token_range(self) -> None:
        """Every token id < vocab_size; else a DataError naming the shard."""
        for split in self.splits.values():
            for shard, file in zip(split.shards, split.shard_files):
                largest = int(shard.max()) if len(shard) else -1
                if largest >= self.vocab_size:
                    raise DataError(f"shard {file} holds token id {largest}, outside the vocabulary of {self.vocab_size}: re-run `gigatrain prepare ... --overwrite`")

    def split(self, name: str) -> TokenSplit:
        if name not in self.splits:
            raise DataError(f"{self.path} has no {name!r} split (it has: {', '.join(self.splits)})")
        return self.splits[name]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={split.num_tokens}" for name, split in self.splits.items())
        return f"TokenData({str(self.path)!r}, vocab_size={self.vocab_size}, tokens: {sizes})"


def _too_little_data(split: TokenSplit, seq_len: int, windows_needed: int) -> DataError:
    needed = windows_needed * seq_len + 1
    return DataError(
        f"the {split.name} split has {split.num_tokens} tokens; {windows_needed} sequence(s) of {seq_len} need {needed}:"
        " use a smaller batch or sequence length, or prepare more data"
    )


class BatchLoader:
    """Deterministic, resumable training batches for one rank (see the module docstring)."""

    def __init__(
        self,
        split: TokenSplit,
        seq_len: int,
        global_batch: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if seq_len < 1 or global_batch < 1 or world_size < 1 or seed < 0:
            raise ValueError(f"need seq_len, global_batch, world_size >= 1 and seed >= 0, got {seq_len}, {global_batch}, {world_size}, {seed}")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.split, self.seq_len, self.global_batch = split, seq_len, global_batch
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.local_batch = global_batch // world_size
        self.num_windows = max(0, (split.num_tokens - 1) // seq_len)
        self.batches_per_epoch = self.num_windows // global_batch
        if self.batches_per_epoch == 0:
            raise _too_little_data(split, seq_len, global_batch)
        self.epoch = 0
        self.batch_in_epoch = 0  # the next batch to produce
        self._order_epoch: int | None = None  # cache of the current epoch's permutation
        self._order = np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The window indices of `epoch` in visiting order (cached: derived, not state)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def window_starts(self, epoch: int, batch: int) -> np.ndarray:
        """Token offsets of this rank's windows in global batch `batch` of `epoch`."""
        first = batch * self.global_batch + self.rank * self.local_batch
        return self.epoch_order(epoch)[first : first + self.local_batch] * self.seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [local_batch, seq_len]; targets are inputs shifted by one."""
        windows = self.split.windows(self.window_starts(self.epoch, self.batch_in_epoch), self.seq_len + 1)
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        tokens = torch.from_numpy(windows)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Plain ints (JSON-friendly). The position plus what it depends on, to check on load."""
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "num_windows": self.num_windows,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was saved (with its seed); world size and rank may differ."""
        saved = {key: int(state[key]) for key in ("seq_len", "global_batch", "num_windows", "shuffle") if key in state}
        current = {"seq_len": self.seq_len, "global_batch": self.global_batch, "num_windows": self.num_windows, "shuffle": int(self.shuffle)}
        changed = [f"{key} {saved[key]} -> {current[key]}" for key in saved if saved[key] != current[key]]
        if changed:
            raise DataError(f"cannot resume the data loader: {', '.join(changed)} since the checkpoint; resume with the same data, sequence length and global batch")
        epoch, batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch_in_epoch < self.batches_per_epoch:
            raise DataError(f"loader state epoch={epoch} batch_in_epoch={batch_in_epoch} is out of range ({self.batches_per_epoch} batches per epoch)")
        self.seed = int(state["seed"])
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._order_epoch = None  # the seed may have changed


def eval_batches(
    split: TokenSplit,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches: windows in stream order from the start, no shuffling.

    Every token is a target exactly once. The last batch may hold fewer windows
    (weight losses by inputs.numel() for an exact mean). With world_size > 1, rank r
    gets batches r, r + world_size, ... of the same max_batches batches.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"need seq_len and batch_size >= 1, got {seq_len}, {batch_size}")
    num_windows = max(0, (split.num_tokens - 1) // seq_len)
    if num_windows == 0:
        raise _too_little_data(split, seq_len, 1)
    num_batches = -(-num_windows // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for batch in range(rank, num_batches, world_size):
        first = batch * batch_size
        starts = np.arange(first, min(first + batch_size, num_windows)) * seq_len
        tokens = torch.from_numpy(split.windows(starts, seq_len + 1))
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
