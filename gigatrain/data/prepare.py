"""prepare: text sources -> a folder of token shards + tokenizer.json + manifest.json.

    prepare(["corpus/", "extra/*.jsonl"], Path("data/corpus"), tokenizer="bpe", vocab_size=4096)

Sources (expanded, de-duplicated and sorted by path, so the order never depends on
the file system or on the order they were given in):
  - a text file: one document. Read as UTF-8; bytes that are not UTF-8 become U+FFFD
    (the stdlib alone has a few latin-1 files; one bad byte should not stop a run).
  - a folder: every file under it (recursively, hidden names skipped) whose suffix
    is in TEXT_SUFFIXES, or .jsonl / .parquet.
  - a glob pattern ("data/*.txt", "corpus/**"): the matching files, filtered like a folder.
  - .jsonl: one document per line, the string field `text_field` of its JSON object.
  - .parquet: one document per row, the string column `text_field`.
Empty documents (and null jsonl/parquet values) are skipped.

The validation split is `val_sources` when given; otherwise each document goes to
val when hash(seed, its key) < val_fraction. The key is the file's path relative to
its source (plus ":line" / ":row"), so a document's split depends on nothing else:
adding files, or moving the data folder, does not reshuffle the others.

Each split's token stream is, per document, [eot] + encode(document); it is cut
into shards `train_000000.bin`, ... of at most `shard_tokens` raw little-endian
uint16 (uint32 when the vocabulary is over 65536) tokens. The folder is built
under a temporary name beside `out_dir` and renamed into place when complete, so a
folder with a manifest.json is always a complete one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import sysconfig
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gigatrain.data import DataError
from gigatrain.data.tokenizers import TOKENIZER_FILE, Tokenizer, make_tokenizer

MANIFEST_FILE = "manifest.json"
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
# Documents are tokenized in batches of about this many characters, so that the
# Rust tokenizer has work for all its threads while memory stays bounded.
ENCODE_BATCH_CHARS = 4_000_000


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
    # utf-8-sig drops a leading byte-order mark, which is not part of the text.
    return path.read_bytes().decode("utf-8-sig", errors="replace")


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


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail before the work, not after, when out_dir cannot be (re)placed."""
    if not out_dir.exists():
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return  # an empty folder is simply replaced
    if not (out_dir / MANIFEST_FILE).is_file():
        raise DataError(f"{out_dir} exists and is not a gigatrain data folder: choose another --out")
    if not overwrite:
        raise DataError(f"{out_dir} already holds prepared data: pass --overwrite to replace it, or choose another --out")


def _publish(built: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished folder into place in one rename."""
    if overwrite and (out_dir / MANIFEST_FILE).is_file():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
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
    # A hidden sibling: same file system, so the final rename is atomic. (Not mkdtemp:
    # its 0700 mode would end up on the published folder.)
    building = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    building.mkdir()
    try:
        split_of = HashSplit(seed, val_fraction)
        args = (train_files, val_files, split_of, tokenizer, vocab_size, text_field, shard_tokens)
        built_tokenizer, splits = _build(building, *args)
        if val_files is None and _rebalance(split_of, splits):
            # Tiny corpora only: redo everything (the BPE too, it must not see val text).
            shutil.rmtree(building)
            building.mkdir()
            built_tokenizer, splits = _build(building, *args)
        for name in ("train", "val"):
            if splits[name]["documents"] == 0:
                sources = "--val sources" if name == "val" and val_files is not None else "sources"
                hint = "add documents" if val_files is not None else "add documents or pass --val SOURCE"
                raise DataError(f"no {name} documents (non-empty texts) found in the {sources}: {hint}")
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
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already when published


def _check_options(vocab_size: int, val_fraction: float, text_field: str, shard_tokens: int, has_val: bool) -> None:
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard size {shard_tokens!r} must be a positive number of tokens")
    if not text_field:
        raise DataError("--text-field must not be empty: pass the name of the field/column holding the text")
    if not has_val and not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive), or pass --val SOURCE")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise DataError(f"--vocab-size {vocab_size!r} must be a positive integer")


def prepare(
    sources: list[str],
    out_dir: Path,
    *,
    val_sources: list[str] | None = None,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    text_field: str = "text",
    shard_tokens: int = 2**24,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Tokenize `sources` into `out_dir` (see the module docstring); returns the manifest.

    `tokenizer` is "byte", "bpe" (trained on the train split, vocab_size tokens) or
    the path of a tokenizer.json. Refuses to replace prepared data unless `overwrite`.
    """
    if not sources:
        raise DataError("no sources given: pass text files, folders, glob patterns, .jsonl or .parquet files")
    out_dir = Path(out_dir)
    _check_options(vocab_size, val_fraction, text_field, shard_tokens, bool(val_sources))
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
        vocab_size=vocab_size,
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
        spec = "json-" + hashlib.sha256(file.read_bytes()).hexdigest()[:12]
    return f"stdlib-py{platform.python_version()}-{spec}-v{FORMAT_VERSION}"


def ensure_default_data(cache_dir: Path, tokenizer: str = "bpe", vocab_size: int = 4096) -> Path:
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
