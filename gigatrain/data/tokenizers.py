"""Tokenizers: raw bytes, a byte-level BPE we train, or any Hugging Face tokenizer.json.

Three kinds, one interface (`Tokenizer`):
  byte  256 ids, one per UTF-8 byte; nothing to train. eot_id = 0 (the NUL byte),
        because NUL does not occur in real text; a NUL inside a document would
        read as a document separator, which is harmless. Saved as a Hugging Face
        tokenizer.json that gives the same ids (a BPE without merges over ByteLevel's
        256 characters, see `_new_byte_level`); gigatrain itself encodes with
        `str.encode`, which is faster.
  bpe   GPT-2 style byte-level BPE trained here with Hugging Face `tokenizers`:
        ByteLevel pre-tokenizer (no prefix space, so decode(encode(s)) == s), all
        256 bytes in the initial alphabet (any text encodes, nothing is unknown)
        and `<|endoftext|>` = eot at id 0.
  json  any other Hugging Face tokenizer.json; eot is the first of
        `<|endoftext|>`, `</s>`, `<|end_of_text|>` that it has.

The kind is read from the tokenizer itself, not from where it came from: a
tokenizer.json built exactly like ours (see `_kind_of`) is "byte" or "bpe", so
save -> load round trips all three kinds.

Every kind saves to `directory/tokenizer.json`, a Hugging Face tokenizer file.
Special-token text inside a document (a literal "<|endoftext|>") is encoded as
ordinary text: only `prepare` inserts separators.

`save_pretrained` writes what transformers' AutoTokenizer loads: tokenizer.json with
gigatrain's beginning-of-document convention as its post-processor (every document
is [eot] + its tokens, see `encode_documents`) and tokenizer_config.json stating it
(bos_token = eot, add_bos_token), so that transformers' ids for a text are the ids
the model was trained on for that text as a document.

Long documents (a minified file, a huge JSON line) are encoded in pieces of at most
PIECE_CHARS characters, ENCODE_BATCH_CHARS characters at a time, so the tokenizer's
working memory is bounded whatever the document's length (the document's own text and
its token array still grow with it). A byte-level BPE (ours, or any tokenizer.json with
the same ByteLevel pre-tokenizer) is cut only right before a space that precedes a
non-space character, where its pre-tokenizer cuts anyway: the tokens are exactly those
of the whole document. A run of PIECE_CHARS characters without such a space (base64,
a megabyte of one character) is cut hard at PIECE_CHARS, which can change a token or
two at the cut. Other tokenizers (their pre-tokenizer's boundaries are unknown) are
given whole documents.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tokenizers as hf
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from gigatrain.data.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # transformers' settings beside tokenizer.json
EOT_TOKEN = "<|endoftext|>"
EOT_CANDIDATES = (EOT_TOKEN, "</s>", "<|end_of_text|>")  # searched in this order
KINDS = ("byte", "bpe", "json")

# The longest piece of a document handed to the tokenizer at once: the BPE's memory and
# time grow with it (one 10 MB line, encoded whole, peaked at 2.2 GB).
PIECE_CHARS = 100_000
# Pieces are encoded in batches of about this many characters, so that the Rust
# tokenizer has work for all its threads while memory stays bounded.
ENCODE_BATCH_CHARS = 1_000_000
# Where a ByteLevel pre-tokenizer always starts a pre-token: its regex gives a space
# only to the pre-token that follows it (` ?\p{L}+`, ` ?[^\s\p{L}\p{N}]+`, ...), and a
# run of whitespace keeps its last space for the next pre-token. Python's \S excludes
# every character the regex's \s matches (and a few more), so this never cuts wrongly.
_PIECE_BOUNDARY = re.compile(r" (?=\S)")


def split_long_text(text: str, max_chars: int) -> list[str]:
    """`text` cut into pieces of at most max_chars characters, at pre-token boundaries.

    Each cut is the first boundary in the second half of the window, so pieces are
    at least max_chars / 2 long; a window without one is cut hard at max_chars.
    """
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        # endpos one past the window: the lookahead may see the character after a space.
        boundary = _PIECE_BOUNDARY.search(text, start + max_chars // 2, start + max_chars + 1)
        end = boundary.start() if boundary else start + max_chars
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


class Tokenizer:
    """What the rest of gigatrain needs from a tokenizer."""

    kind: str  # "byte" | "bpe" | "json"
    vocab_size: int  # every id is < vocab_size
    eot_id: int  # separates documents in the token stream
    hf: hf.Tokenizer  # the Hugging Face tokenizer with the same ids: what `save` writes

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def pieces(self, text: str) -> list[str]:
        """`text` in pieces whose encodings, concatenated, are its encoding (see the module docstring)."""
        return [text]

    def encode_documents(self, texts: list[str], dtype: np.dtype) -> np.ndarray:
        """[eot] + encode(text) for each text, concatenated: the token stream of `prepare`."""
        # Separator first, so every document (including the first) starts after an eot:
        # at sampling time the model starts from [eot], exactly like in training.
        eot = np.array([self.eot_id], dtype=dtype)
        parts: list[np.ndarray] = []
        for batch in _piece_batches(self, texts):
            starts, pieces = zip(*batch)
            for starts_document, ids in zip(starts, self.encode_batch(list(pieces))):
                if starts_document:
                    parts.append(eot)
                parts.append(np.array(ids, dtype=dtype))
        return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: Path) -> Path:
        """`directory/tokenizer.json`, which `load_tokenizer` reads back as this tokenizer."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))
        return path

    def save_pretrained(self, directory: Path, *, model_max_length: int | None = None) -> Path:
        """`directory` as a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json):
        transformers' `AutoTokenizer.from_pretrained(directory)(text)["input_ids"]` is
        encode_documents([text]), and with add_special_tokens=False it is encode(text)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        eot = self.hf.id_to_token(self.eot_id)
        exported = hf.Tokenizer.from_str(self.hf.to_str())
        # The document start, for tools that read tokenizer.json alone (tokenizers, vLLM's
        # detokenizer, older transformers); a pair is two documents, as prepare would write them.
        exported.post_processor = processors.TemplateProcessing(
            single=f"{eot}:0 $A:0", pair=f"{eot}:0 $A:0 {eot}:1 $B:1", special_tokens=[(eot, self.eot_id)])
        exported.save(str(directory / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            # gigatrain's documents start with eot (and so end at the next one): transformers 5
            # rebuilds the post-processor from these, the same "<eot> $A" as tokenizer.json's.
            "bos_token": eot,
            "add_bos_token": True,
            "eos_token": eot,
            "add_eos_token": False,
            # A literal "<|endoftext|>" inside a text is text, as when prepare encoded the data;
            # for the byte kind it also keeps the text "Ā" (ByteLevel's name for the NUL byte) text.
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,  # decode(encode(text)) == text
        }
        unk = json.loads(self.hf.to_str())["model"].get("unk_token")
        if unk is not None:
            config["unk_token"] = unk
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        (directory / HF_TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return directory

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def _piece_batches(tokenizer: Tokenizer, texts: list[str]) -> Iterator[list[tuple[bool, str]]]:
    """Every text's pieces, as (is the text's first piece, piece), about ENCODE_BATCH_CHARS characters a batch."""
    batch: list[tuple[bool, str]] = []
    chars = 0
    for text in texts:
        for index, piece in enumerate(tokenizer.pieces(text)):
            batch.append((index == 0, piece))
            chars += len(piece)
            if chars >= ENCODE_BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


class ByteTokenizer(Tokenizer):
    """ids are the UTF-8 bytes of the text; eot is the NUL byte (id 0)."""

    kind = "byte"
    vocab_size = 256
    eot_id = 0

    def __init__(self) -> None:
        self.hf = _new_byte_level()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def encode_documents(self, texts: list[str], dtype: np.dtype) -> np.ndarray:
        # Same stream as the generic version, without building Python lists of ints.
        separator = np.array([self.eot_id], dtype=np.uint8)
        parts = []
        for text in texts:
            parts += [separator, np.frombuffer(text.encode("utf-8"), dtype=np.uint8)]
        return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype=dtype)

    def decode(self, ids: Iterable[int]) -> str:
        # A window can cut a multi-byte character in half: show U+FFFD rather than fail.
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (our trained BPE, or a user's tokenizer.json)."""

    def __init__(self, hf_tokenizer: hf.Tokenizer, kind: str, eot_id: int) -> None:
        # A user's tokenizer.json may truncate or pad (e.g. to 512 tokens): that would
        # silently cut documents, so both are switched off.
        hf_tokenizer.no_truncation()
        hf_tokenizer.no_padding()
        # "<|endoftext|>" written inside a document is text, not a separator.
        hf_tokenizer.encode_special_tokens = True
        self.hf = hf_tokenizer
        self.kind = kind
        self.eot_id = eot_id
        # ids may be sparse in a foreign tokenizer: size the vocabulary by the largest id.
        self.vocab_size = max(hf_tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self._splits_at_spaces = _has_byte_level_boundaries(hf_tokenizer)

    def pieces(self, text: str) -> list[str]:
        return split_long_text(text, PIECE_CHARS) if self._splits_at_spaces else [text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Multi-threaded in Rust; add_special_tokens=False: no BOS/EOS from a post-processor.
        return [encoding.ids for encoding in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def _has_byte_level_boundaries(hf_tokenizer: hf.Tokenizer) -> bool:
    """True when a space before a non-space always starts a pre-token (`split_long_text` is exact).

    That takes a GPT-2 style ByteLevel regex with no prefix space, no normalizer that could
    move characters across a cut, and no added token with a space inside (it is matched
    before pre-tokenizing and could straddle a cut).
    """
    config = json.loads(hf_tokenizer.to_str())
    pre_tokenizer = config.get("pre_tokenizer") or {}
    byte_level = pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True)
    no_prefix_space = not pre_tokenizer.get("add_prefix_space", False)
    spaced_added = any(" " in token["content"] for token in config.get("added_tokens") or [])
    return bool(byte_level and no_prefix_space and config.get("normalizer") is None and not spaced_added)


def _new_bpe() -> hf.Tokenizer:
    """An untrained byte-level BPE with gigatrain's pre-tokenizer and decoder."""
    tokenizer = hf.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_characters() -> list[str]:
    """ByteLevel's character for each byte (GPT-2's table): the printable bytes stand for
    themselves, the others for the characters from U+0100 up, in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    shifted = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(shifted)) for byte in range(256)]


def _new_byte_level() -> hf.Tokenizer:
    """The byte kind as a Hugging Face tokenizer: ByteLevel turns the whole text (no regex
    split: nothing would merge across it anyway) into one character per UTF-8 byte, and a
    BPE without merges gives each character its byte's value as id."""
    vocab = {character: byte for byte, character in enumerate(_byte_characters())}
    tokenizer = hf.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _signature(hf_tokenizer: hf.Tokenizer, *, with_vocab: bool) -> dict:
    """The parts of a tokenizer.json that decide gigatrain's ids and text. Not the post-processor:
    gigatrain encodes without it (an exported tokenizer.json has one), nor truncation or padding,
    which HFTokenizer switches off."""
    config = json.loads(hf_tokenizer.to_str())
    keys = ("normalizer", "pre_tokenizer", "decoder", "added_tokens")
    return {"model": config["model"] if with_vocab else config["model"]["type"]} | {key: config.get(key) for key in keys}


def _reference_bpe() -> hf.Tokenizer:
    reference = _new_bpe()
    reference.add_special_tokens([EOT_TOKEN])  # id 0, exactly where BpeTrainer puts it
    return reference


def _kind_of(hf_tokenizer: hf.Tokenizer) -> str:
    """"byte" or "bpe" for a tokenizer.json built exactly like ours (a BPE: anything but its
    merges), else "json"."""
    byte_level = _new_byte_level()
    # The size first: a 128k-token vocabulary is not compared entry by entry.
    if (hf_tokenizer.get_vocab_size(with_added_tokens=True) == byte_level.get_vocab_size(with_added_tokens=True)
            and _signature(hf_tokenizer, with_vocab=True) == _signature(byte_level, with_vocab=True)):
        return "byte"
    if _signature(hf_tokenizer, with_vocab=False) == _signature(_reference_bpe(), with_vocab=False):
        return "bpe"
    return "json"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts`; deterministic for the same texts and vocab_size.

    The vocabulary can come out smaller than vocab_size when the texts run out of
    pairs to merge; `vocab_size` of the result is the real size.
    """
    minimum = 256 + 1  # every byte, plus <|endoftext|>
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise DataError(f"vocab size {vocab_size!r} is too small for a byte-level BPE: use --vocab-size {minimum} or more")
    tokenizer = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The same pieces the encoder sees: training's memory stays bounded too.
    tokenizer.train_from_iterator((piece for text in texts for piece in split_long_text(text, PIECE_CHARS)), trainer)
    return HFTokenizer(tokenizer, kind="bpe", eot_id=tokenizer.token_to_id(EOT_TOKEN))


def from_tokenizer_json(path: Path | str) -> Tokenizer:
    """Load a Hugging Face tokenizer.json (kind "byte" or "bpe" if it is one of ours, else "json")."""
    path = Path(path)
    try:
        hf_tokenizer = hf.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on bad files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path} is not a valid Hugging Face tokenizer.json ({reason}): pass a tokenizer.json saved by tokenizers or transformers") from None
    kind = _kind_of(hf_tokenizer)
    if kind == "byte":
        return ByteTokenizer()
    for name in EOT_CANDIDATES:
        eot_id = hf_tokenizer.token_to_id(name)
        if eot_id is not None:
            break
    else:
        looked_for = ", ".join(EOT_CANDIDATES)
        raise DataError(f"{path} has no end-of-text token (looked for {looked_for}): add one of them to the tokenizer's special tokens")
    return HFTokenizer(hf_tokenizer, kind=kind, eot_id=eot_id)


def _tokenizer_file(path: Path) -> Path:
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"tokenizer file {file} not found: pass a tokenizer.json or a folder containing one")
    return file


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load what `Tokenizer.save` wrote: `path` is the tokenizer.json or its folder."""
    file = _tokenizer_file(Path(path))
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{file} is not valid JSON ({error}): re-run `gigatrain prepare` or pass another tokenizer") from None
    # Before the byte kind was saved as a Hugging Face file, it was this one line; prepared data
    # folders and runs still hold it, and it names exactly one tokenizer, so it still loads.
    if isinstance(config, dict) and "gigatrain_tokenizer" in config:
        if config.get("gigatrain_tokenizer") != "byte" or config.get("vocab_size") != 256:
            raise DataError(f"{file} describes an unknown gigatrain tokenizer {config!r}: re-run `gigatrain prepare`")
        return ByteTokenizer()
    return from_tokenizer_json(file)


def make_tokenizer(spec: str, texts: Iterable[str] | None = None, vocab_size: int = 4096) -> Tokenizer:
    """`spec` is "byte", "bpe" (trained on `texts`) or a path to a tokenizer.json (or its folder)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        return train_bpe(texts if texts is not None else [], vocab_size)
    if Path(spec).exists():
        return load_tokenizer(spec)
    raise DataError(f"unknown tokenizer {spec!r}: use --tokenizer byte, bpe or the path of a tokenizer.json")
