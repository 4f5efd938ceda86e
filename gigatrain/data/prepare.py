"""prepare: text sources -> a folder of token shards + tokenizer.json + manifest.json.

    prepare(["corpus/", "extra/*.jsonl"], Path("data/corpus"), tokenizer="bpe", vocab_size=4096)

Sources (expanded, de-duplicated and sorted by path, so the order never depends on
the file system or on the order they were given in):
  - a text file: one document. Read as UTF-8; bytes that are not UTF-8 become U+FFFD
    (the stdlib alone has a few latin-1 files; one bad byte should not stop a run).
    A file with a NUL byte is not text (an image or archive named .txt): it is refused.
  - a folder: every file under it (recursively, hidden names skipped) whose suffix
    is in TEXT_SUFFIXES, or .jsonl / .parquet.
  - a glob pattern ("data/*.txt", "corpus/**"): the matching files, filtered like a folder.
  - .jsonl: one document per line, the string field `text_field` of its JSON object.
  - .parquet: one document per row, the string column `text_field`.
Empty documents (and null jsonl/parquet values) are skipped.

The validation split is `val_sources` when given; otherwise each document goes to
val when hash(seed, its key) < val_fraction. The key is the file's path relative to
its source (plus ":line" / ":row"), so a document's split depends on nothing else:
adding files, or moving the data folder, does not reshuffle the others. The split is
by document, so a few large documents can hold out far more (or less) than
val_fraction of the tokens: `prepare` then warns on stderr.

Each split's token stream is, per document, [eot] + encode(document); it is cut
into shards `train_000000.bin`, ... of at most `shard_tokens` raw little-endian
uint16 (uint32 when the vocabulary is over 65536) tokens. The folder is built
under a temporary name beside `out_dir` (`.NAME.tmp-HOST-PID-RANDOM`) and renamed
into place when complete, so a folder with a manifest.json is always a complete one.
A temporary folder left by a killed `prepare` is removed by the next `prepare` into
the same `out_dir` on the same host, once its process is gone; a concurrent one is
left alone. `overwrite` replaces only a folder that `prepare` wrote (its manifest,
tokenizer and shards, nothing else); any other folder is never deleted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import sys
import sysconfig
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gigatrain.data.errors import DataError
from gigatrain.data.tokenizers import ENCODE_BATCH_CHARS, TOKENIZER_FILE, Tokenizer, make_tokenizer
from gigatrain.paths import NO_SPACE_ERRNOS, sha256_file

MANIFEST_FILE = "manifest.json"
DEFAULT_VOCAB_SIZE = 4096
FORMAT_NAME = "gigatrain-tokens"
FORMAT_VERSION = 1

TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .tex .org .html .htm .xml .csv .tsv .yaml .yml .toml .ini .cfg"
    " .py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .sh .sql .css".split()
)
TABLE_SUFFIXES = frozenset({".jsonl", ".parquet"})
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | TABLE_SUFFIXES

# The BPE learns its merges from at most this many characters of the train split:
# BPE statistics settle long before that, and training time grows with it.
MAX_BPE_TRAINING_CHARS = 20_000_000


@dataclass(frozen=True)
class SourceFile:
    path: Path  # where to read it
    key: str  # stable name for the split hash: path relative to the source it came from


@dataclass(frozen=True)
class Document:
    key: str
    text: str


# ---------------------------------------------------------------------------
# Sources -> files -> documents


def _is_glob(source: str) -> bool:
    return any(char in source for char in "*?[")


def _glob_root(pattern: str) -> Path:
    """The folder a glob pattern starts from: its leading parts without wildcards."""
    fixed = []
    for part in Path(pattern).parts:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _is_supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_SUFFIXES


def _suffix_list() -> str:
    return " ".join(sorted(SUPPORTED_SUFFIXES))


def _expand_source(source: str) -> list[SourceFile]:
    """The files one source names (see the module docstring)."""
    if _is_glob(source):
        root = _glob_root(source)
        matches = sorted(Path(match) for match in glob.glob(source, recursive=True))
        files = [SourceFile(path, path.relative_to(root).as_posix()) for path in matches if path.is_file() and _is_supported(path)]
        if not files:
            raise DataError(f"pattern {source!r} matched no files ending in one of: {_suffix_list()}")
        return files
    path = Path(source)
    if path.is_dir():
        matches = sorted(match for match in path.rglob("*") if match.is_file() and _is_supported(match))
        # Skip hidden names (.git, .venv, editor backups): they are never a corpus.
        files = [SourceFile(match, match.relative_to(path).as_posix()) for match in matches]
        files = [file for file in files if not any(part.startswith(".") for part in Path(file.key).parts)]
        if not files:
            raise DataError(f"folder {path} has no files ending in one of: {_suffix_list()}")
        return files
    if path.is_file():
        return [SourceFile(path, path.name)]
    raise DataError(f"source {source} does not exist: pass text files, folders, glob patterns, .jsonl or .parquet files")


def expand_sources(sources: Iterable[str]) -> list[SourceFile]:
    """All files the sources name, each once, sorted by path."""
    files: dict[Path, SourceFile] = {}
    for source in sources:
        for file in _expand_source(str(source)):
            files.setdefault(file.path.resolve(), file)
    return sorted(files.values(), key=lambda file: file.path.as_posix())


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    # NUL never occurs in text (and would read as the byte tokenizer's separator).
    if b"\0" in data:
        raise DataError(f"{path} is not a text file (it holds NUL bytes): remove it from the sources")
    # utf-8-sig drops a leading byte-order mark, which is not part of the text.
    return data.decode("utf-8-sig", errors="replace")


def _jsonl_documents(file: SourceFile, text_field: str) -> Iterator[Document]:
    with open(file.path, encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{file.path}:{line_number}: not valid JSON: each line of a .jsonl file must be one JSON object") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{file.path}:{line_number}: no {text_field!r} field (has: {fields}): pass --text-field NAME")
            text = record[text_field]
            if text is not None and not isinstance(text, str):
                raise DataError(f"{file.path}:{line_number}: field {text_field!r} is a {type(text).__name__}, not a string: pass --text-field NAME")
            if text:
                yield Document(f"{file.key}:{line_number}", text)


def _parquet_documents(file: SourceFile, text_field: str) -> Iterator[Document]:
    import pyarrow as pa  # imported here: only parquet sources pay for it
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(file.path)
    except Exception as error:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{file.path} is not a readable parquet file ({type(error).__name__}: {error})".splitlines()[0]) from None
    columns = table.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{file.path} has no column {text_field!r} (columns: {', '.join(columns)}): pass --text-field NAME")
    column_type = table.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{file.path}: column {text_field!r} holds {column_type}, not strings: pass --text-field NAME")
    row = 0
    for batch in table.iter_batches(columns=[text_field], batch_size=8192):
        for text in batch.column(0).to_pylist():
            if text:
                yield Document(f"{file.key}:{row}", text)
            row += 1


def iter_documents(file: SourceFile, text_field: str = "text") -> Iterator[Document]:
    """The documents in one file, in file order."""
    suffix = file.path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(file, text_field)
    elif suffix == ".parquet":
        yield from _parquet_documents(file, text_field)
    else:
        text = _read_text(file.path)
        if text:
            yield Document(file.key, text)


# ---------------------------------------------------------------------------
# Train / val split


def val_score(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key): below val_fraction means val."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass
class HashSplit:
    """Assigns documents to val by their own hash; remembers the borderline ones.

    When the hash sends no document to val (or all of them), `prepare` runs again
    with `forced` moving the borderline document across, so both splits are non-empty.
    """

    seed: int
    val_fraction: float
    forced: dict[str, str] = field(default_factory=dict)  # key -> split
    most_val_like_train: tuple[float, str] | None = None  # (score, key), lowest train score
    least_val_like_val: tuple[float, str] | None = None  # highest val score

    def __call__(self, key: str) -> str:
        score = val_score(key, self.seed)
        split = self.forced.get(key) or ("val" if score < self.val_fraction else "train")
        if split == "train" and (self.most_val_like_train is None or score < self.most_val_like_train[0]):
            self.most_val_like_train = (score, key)
        if split == "val" and (self.least_val_like_val is None or score > self.least_val_like_val[0]):
            self.least_val_like_val = (score, key)
        return split


def _split_documents(
    train_files: list[SourceFile], val_files: list[SourceFile] | None, text_field: str, split_of: HashSplit
) -> Iterator[tuple[str, Document]]:
    """(split name, document) for every document, in a deterministic order."""
    for file in train_files:
        for document in iter_documents(file, text_field):
            yield ("train" if val_files is not None else split_of(document.key)), document
    for file in val_files or []:
        for document in iter_documents(file, text_field):
            yield "val", document


# ---------------------------------------------------------------------------
# Tokens -> shards


class ShardWriter:
    """Appends tokens to `{split}_000000.bin`, `{split}_000001.bin`, ... and hashes them."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._sha256 = hashlib.sha256()
        self._tokens_in_shard = 0

    def _file_name(self) -> str:
        return f"{self.split}_{len(self.shards):06d}.bin"

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                self._file = open(self.directory / self._file_name(), "wb")
            room = self.shard_tokens - self._tokens_in_shard
            data = tokens[:room].astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._sha256.update(data)
            self._tokens_in_shard += min(room, len(tokens))
            tokens = tokens[room:]
            if self._tokens_in_shard == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())  # the rename that publishes the folder must not outrun the data
        self._file.close()
        self.shards.append({"file": self._file_name(), "tokens": self._tokens_in_shard, "sha256": self._sha256.hexdigest()})
        self._file, self._sha256, self._tokens_in_shard = None, hashlib.sha256(), 0

    def close(self) -> list[dict]:
        if self._file is not None:
            self._close_shard()
        return self.shards


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The first texts, up to about max_chars characters in all."""
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        total += len(text)
        yield text


def _write_splits(
    directory: Path, documents: Iterator[tuple[str, Document]], tokenizer: Tokenizer, shard_tokens: int
) -> dict[str, dict]:
    """Tokenize every document into its split's shards; the manifest's "splits" entry."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(directory, split, dtype, shard_tokens) for split in ("train", "val")}
    stats = {split: {"tokens": 0, "bytes": 0, "documents": 0} for split in writers}
    pending: dict[str, list[str]] = {split: [] for split in writers}
    pending_chars = dict.fromkeys(writers, 0)

    def flush(split: str) -> None:
        tokens = tokenizer.encode_documents(pending[split], dtype)
        writers[split].write(tokens)
        stats[split]["tokens"] += len(tokens)
        stats[split]["documents"] += len(pending[split])
        stats[split]["bytes"] += sum(len(text.encode("utf-8")) for text in pending[split])
        pending[split], pending_chars[split] = [], 0

    for split, document in documents:
        pending[split].append(document.text)
        pending_chars[split] += len(document.text)
        if pending_chars[split] >= ENCODE_BATCH_CHARS:
            flush(split)
    for split in writers:
        if pending[split]:
            flush(split)
    return {split: stats[split] | {"shards": writers[split].close()} for split in writers}


# ---------------------------------------------------------------------------
# The output folder


_SHARD_NAME = re.compile(r"(train|val)_\d{6}\.bin")


def _is_our_file(path: Path) -> bool:
    """A name `prepare` writes into its folder."""
    return path.is_file() and (path.name in (MANIFEST_FILE, TOKENIZER_FILE) or bool(_SHARD_NAME.fullmatch(path.name)))


def _foreign_entry(folder: Path) -> Path | None:
    """Something in `folder` that `prepare` did not write (None: only our own files)."""
    return next((entry for entry in sorted(folder.iterdir()) if not _is_our_file(entry)), None)


def _is_prepared_data(folder: Path) -> bool:
    """True for a folder `prepare` wrote: our manifest format, and nothing else of anyone's inside."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME and _foreign_entry(folder) is None


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail before the work, not after, when out_dir cannot be (re)placed."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder: choose another --out")
    if not any(out_dir.iterdir()):
        return  # an empty folder is simply replaced
    if not _is_prepared_data(out_dir):
        # Never deleted, --overwrite or not: it may be anyone's.
        found = _foreign_entry(out_dir) or out_dir / MANIFEST_FILE
        raise DataError(f"{out_dir} is not a gigatrain data folder (it holds {found.name}): choose another --out; "
                        f"prepare replaces only folders it wrote")
    if not overwrite:
        raise DataError(f"{out_dir} already holds prepared data: pass --overwrite to replace it, or choose another --out")


def _scratch_name(out_dir: Path, kind: str) -> Path:
    """`.NAME.KIND-HOST-PID-RANDOM` beside out_dir: who made it, so a later run can tell a stale one."""
    return out_dir.with_name(f".{out_dir.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove_stale_scratch(out_dir: Path) -> None:
    """Remove the temporary folders that killed runs of `prepare` left beside out_dir.

    Only ours (our name pattern, this host, only files prepare writes inside) and only
    stale ones (their process is gone: a concurrent prepare keeps its folder). An `.old-`
    folder (the data being replaced) goes only once the replacement is in place.
    """
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
    if not out_dir.parent.is_dir():
        return
    for entry in out_dir.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if not match or match["host"] != socket.gethostname() or _process_exists(int(match["pid"])):
            continue
        if match[1] == "old" and not out_dir.is_dir():
            continue
        if entry.is_dir() and not entry.is_symlink() and _foreign_entry(entry) is None:
            shutil.rmtree(entry, ignore_errors=True)


def _publish(built: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished folder into place in one rename."""
    if overwrite and (out_dir / MANIFEST_FILE).is_file():
        if not _is_prepared_data(out_dir):  # checked again: it may have changed while we worked
            raise DataError(f"{out_dir} changed while preparing and is no longer only prepared data: choose another --out")
        old = _scratch_name(out_dir, "old")
        out_dir.rename(old)
        try:
            built.rename(out_dir)
        except OSError:
            old.rename(out_dir)
            raise DataError(f"{out_dir} was replaced by another process while preparing: run prepare again") from None
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        built.rename(out_dir)  # atomic; fails when another process got there first
    except OSError:
        raise DataError(f"{out_dir} already exists (created while preparing): pass --overwrite to replace it, or choose another --out") from None


def _build(
    directory: Path,
    train_files: list[SourceFile],
    val_files: list[SourceFile] | None,
    split_of: HashSplit,
    tokenizer_spec: str,
    vocab_size: int,
    text_field: str,
    shard_tokens: int,
) -> tuple[Tokenizer, dict]:
    """Tokenizer + shards in `directory`; returns the tokenizer and the "splits" entry."""

    def documents() -> Iterator[tuple[str, Document]]:
        return _split_documents(train_files, val_files, text_field, split_of)

    train_texts = (document.text for split, document in documents() if split == "train")
    tokenizer = make_tokenizer(tokenizer_spec, _capped(train_texts, MAX_BPE_TRAINING_CHARS), vocab_size)
    tokenizer.save(directory)
    return tokenizer, _write_splits(directory, documents(), tokenizer, shard_tokens)


def _rebalance(split_of: HashSplit, splits: dict) -> bool:
    """Move one borderline document when the hash left a split empty; False if impossible."""
    if splits["val"]["documents"] == 0 and splits["train"]["documents"] >= 2:
        split_of.forced[split_of.most_val_like_train[1]] = "val"
        return True
    if splits["train"]["documents"] == 0 and splits["val"]["documents"] >= 2:
        split_of.forced[split_of.least_val_like_val[1]] = "train"
        return True
    return False


def _check_documents(splits: dict, explicit_val: bool) -> None:
    """Both splits need documents; say what to do when they have none."""
    if not explicit_val and splits["train"]["documents"] + splits["val"]["documents"] == 1:
        raise DataError("the sources hold a single document: a validation split needs at least two; "
                        "pass --val SOURCE with held-out text (a file or folder), or add documents")
    for name in ("train", "val"):
        if splits[name]["documents"] == 0:
            sources = "--val sources" if name == "val" and explicit_val else "sources"
            hint = "add documents" if explicit_val else "add documents or pass --val SOURCE"
            raise DataError(f"no {name} documents (non-empty texts) found in the {sources}: {hint}")


def _warn_if_split_is_skewed(splits: dict, val_fraction: float) -> None:
    """The split is by document: a few big documents can make the val share of tokens far from val_fraction."""
    share = splits["val"]["tokens"] / (splits["train"]["tokens"] + splits["val"]["tokens"])
    if val_fraction / 2 <= share <= 2 * val_fraction or abs(share - val_fraction) < 0.01:
        return
    print(f"gigatrain: warning: the validation split holds {share:.1%} of the tokens ({splits['val']['documents']:,} of "
          f"{splits['train']['documents'] + splits['val']['documents']:,} documents), far from --val-fraction "
          f"{val_fraction:g}: documents are split whole; pass --val SOURCE to choose the validation text",
          file=sys.stderr)


def _no_space_error(error: OSError, out_dir: Path) -> DataError | None:
    """A one-line DataError for a full disk or quota; None for any other OSError."""
    if error.errno not in NO_SPACE_ERRNOS:
        return None
    return DataError(f"no space left on the device holding {out_dir.parent.resolve()} ({error.strerror}): "
                     f"free some space or choose another --out; nothing was written")


def _prepare_files(
    train_files: list[SourceFile],
    val_files: list[SourceFile] | None,
    out_dir: Path,
    *,
    manifest_sources: list[str],
    manifest_val_sources: list[str] | None,
    tokenizer: str,
    vocab_size: int,
    val_fraction: float,
    text_field: str,
    shard_tokens: int,
    seed: int,
    overwrite: bool,
) -> dict:
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(out_dir)
    # A hidden sibling: same file system, so the final rename is atomic. (Not mkdtemp:
    # its 0700 mode would end up on the published folder.)
    building = _scratch_name(out_dir, "tmp")
    try:
        building.mkdir()
        split_of = HashSplit(seed, val_fraction)
        args = (train_files, val_files, split_of, tokenizer, vocab_size, text_field, shard_tokens)
        built_tokenizer, splits = _build(building, *args)
        if val_files is None and _rebalance(split_of, splits):
            # Tiny corpora only: redo everything (the BPE too, it must not see val text).
            shutil.rmtree(building)
            building.mkdir()
            built_tokenizer, splits = _build(building, *args)
        _check_documents(splits, explicit_val=val_files is not None)
        if val_files is None:
            _warn_if_split_is_skewed(splits, val_fraction)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": {2: "uint16", 4: "uint32"}[token_dtype(built_tokenizer.vocab_size).itemsize],
            "tokenizer": {
                "kind": built_tokenizer.kind,
                "vocab_size": built_tokenizer.vocab_size,
                "eot_id": built_tokenizer.eot_id,
                "file": TOKENIZER_FILE,
            },
            "splits": splits,
            "sources": manifest_sources,
            "val_sources": manifest_val_sources,
            "val_fraction": None if val_files is not None else val_fraction,
            "text_field": text_field,
            "seed": seed,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (building / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(building, out_dir, overwrite)
        return manifest
    except OSError as error:
        raise _no_space_error(error, out_dir) or error
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already when published


def _check_options(vocab_size: int | None, val_fraction: float, text_field: str, shard_tokens: int, has_val: bool) -> None:
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard size {shard_tokens!r} must be a positive number of tokens")
    if not text_field:
        raise DataError("--text-field must not be empty: pass the name of the field/column holding the text")
    if not has_val and not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive), or pass --val SOURCE")
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 1):
        raise DataError(f"--vocab-size {vocab_size!r} must be a positive integer")


def prepare(
    sources: list[str],
    out_dir: Path,
    *,
    val_sources: list[str] | None = None,
    tokenizer: str = "bpe",
    vocab_size: int | None = None,
    val_fraction: float = 0.05,
    text_field: str = "text",
    shard_tokens: int = 2**24,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Tokenize `sources` into `out_dir` (see the module docstring); returns the manifest.

    `tokenizer` is "byte", "bpe" (trained on the train split, vocab_size tokens,
    default DEFAULT_VOCAB_SIZE) or the path of a tokenizer.json; only "bpe" takes a
    vocab_size. Refuses to replace prepared data unless `overwrite`.
    """
    if not sources:
        raise DataError("no sources given: pass text files, folders, glob patterns, .jsonl or .parquet files")
    out_dir = Path(out_dir)
    _check_options(vocab_size, val_fraction, text_field, shard_tokens, bool(val_sources))
    if vocab_size is not None and tokenizer != "bpe":
        fixed = "fixed at 256" if tokenizer == "byte" else "that of the tokenizer.json"
        raise DataError(f"--vocab-size {vocab_size} applies only to --tokenizer bpe: the vocabulary of "
                        f"--tokenizer {tokenizer} is {fixed}; drop --vocab-size")
    train_files = expand_sources(sources)
    val_files = expand_sources(val_sources) if val_sources else None
    overlap = {file.path.resolve() for file in train_files} & {file.path.resolve() for file in val_files or []}
    if overlap:
        raise DataError(f"{min(overlap)} is in both the sources and --val: validation text must not be trained on")
    return _prepare_files(
        train_files,
        val_files,
        out_dir,
        manifest_sources=[str(source) for source in sources],
        manifest_val_sources=[str(source) for source in val_sources] if val_sources else None,
        tokenizer=tokenizer,
        vocab_size=DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size,
        val_fraction=val_fraction,
        text_field=text_field,
        shard_tokens=shard_tokens,
        seed=seed,
        overwrite=overwrite,
    )


# ---------------------------------------------------------------------------
# The default corpus: Python's own standard library, present wherever Python is.

_NOT_CORPUS_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The standard library's .py sources (no tests, no installed packages), sorted."""
    root = _stdlib_dir()
    files = (path for path in root.rglob("*.py") if path.is_file())
    return sorted(path for path in files if _NOT_CORPUS_DIRS.isdisjoint(path.relative_to(root).parts[:-1]))


def _default_data_key(tokenizer: str, vocab_size: int) -> str:
    """Cache folder name: one per (Python version, tokenizer, vocab size, format version)."""
    if tokenizer == "byte":
        spec = "byte"
    elif tokenizer == "bpe":
        spec = f"bpe{vocab_size}"
    else:
        make_tokenizer(tokenizer)  # a clear error for a bad spec
        file = Path(tokenizer) / TOKENIZER_FILE if Path(tokenizer).is_dir() else Path(tokenizer)
        spec = "json-" + sha256_file(file)[:12]
    return f"stdlib-py{platform.python_version()}-{spec}-v{FORMAT_VERSION}"


def ensure_default_data(cache_dir: Path, tokenizer: str = "bpe", vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Prepare the default corpus into cache_dir/<key> once; return that folder.

    Safe to call from several processes at once: each builds its own temporary
    folder, the first rename wins and the others use the winner's data.
    """
    out_dir = Path(cache_dir) / _default_data_key(tokenizer, vocab_size)
    if (out_dir / MANIFEST_FILE).is_file():
        return out_dir
    root = _stdlib_dir()
    files = [SourceFile(path, path.relative_to(root).as_posix()) for path in default_corpus_files()]
    if not files:
        raise DataError(f"no Python sources found under {root} for the default corpus: prepare your own with `gigatrain prepare`")
    try:
        _prepare_files(
            files,
            None,
            out_dir,
            manifest_sources=[str(root)],
            manifest_val_sources=None,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            val_fraction=0.05,
            text_field="text",
            shard_tokens=2**24,
            seed=0,
            overwrite=False,
        )
    except DataError:
        if (out_dir / MANIFEST_FILE).is_file():
            return out_dir  # another process finished first: its data is identical
        raise
    return out_dir
