"""Tokenizers: round trips, BPE training, tokenizer.json loading and errors."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tokenizers as hf
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, trainers

import gigatrain.data.tokenizers as tokenizers_module
from gigatrain.data import DataError, from_tokenizer_json, load_tokenizer, make_tokenizer, train_bpe
from gigatrain.data.tokenizers import split_long_text

SAMPLES = [
    "hello world",
    "Grüße aus Köln, naïve café — ünïcödé",
    "emoji 😀🚀 and CJK 漢字 and combining e\u0301",
    "  leading spaces, tabs\tand\nnewlines\r\n\n",
    "def f(x):\n    return x ** 2  # <|endoftext|> is just text here\n",
    "",
]

CORPUS = [
    f"def function_{i}(value):\n    return value * {i} + len('the quick brown fox')  # é 😀\n" for i in range(200)
] + ["The quick brown fox jumps over the lazy dog. " * 20, "Grüße, naïve café, 漢字 😀🚀"]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=400)


def foreign_tokenizer(special: list[str]) -> hf.Tokenizer:
    """A byte-level BPE that is not gigatrain's: different special tokens."""
    tokenizer = hf.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def test_byte_tokenizer_is_utf8_bytes_and_round_trips():
    tokenizer = make_tokenizer("byte")
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.eot_id) == ("byte", 256, 0)
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(SAMPLES) == [tokenizer.encode(text) for text in SAMPLES]
    # A window can cut a character in half: decoding must not raise.
    assert tokenizer.decode(list("é".encode())[:1]) == "\ufffd"


def test_bpe_round_trips_and_compresses(bpe):
    assert bpe.kind == "bpe" and bpe.eot_id == 0 and bpe.vocab_size == 400
    for text in SAMPLES + CORPUS[:3]:
        assert bpe.decode(bpe.encode(text)) == text
        assert all(0 <= i < bpe.vocab_size for i in bpe.encode(text))
    text = "\n".join(CORPUS[:50])
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(text) for text in SAMPLES]


def test_special_token_text_inside_a_document_is_not_a_separator(bpe):
    ids = bpe.encode("a <|endoftext|> b")
    assert bpe.eot_id not in ids
    assert bpe.decode([bpe.eot_id]) == "<|endoftext|>"


def test_bpe_training_is_deterministic(bpe):
    again = train_bpe(iter(CORPUS), vocab_size=400)  # an iterator, not a list: same result
    assert again.hf.to_str() == bpe.hf.to_str()
    assert again.encode(CORPUS[0]) == bpe.encode(CORPUS[0])


def test_bpe_vocab_size_must_hold_all_bytes():
    with pytest.raises(DataError, match="257"):
        train_bpe(CORPUS, vocab_size=100)


def test_encode_documents_prefixes_every_document_with_eot(bpe):
    for tokenizer in (bpe, make_tokenizer("byte")):
        stream = tokenizer.encode_documents(["ab c", "", "é😀"], np.dtype("<u2"))
        expected = []
        for text in ["ab c", "", "é😀"]:
            expected += [tokenizer.eot_id] + tokenizer.encode(text)
        assert stream.dtype == np.dtype("<u2")
        assert stream.tolist() == expected


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_save_then_load_round_trips_each_kind(tmp_path, bpe, kind):
    tokenizer = bpe if kind == "bpe" else make_tokenizer("byte")
    path = tokenizer.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    for location in (path, path.parent):  # the file or its folder
        loaded = load_tokenizer(location)
        assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == (tokenizer.kind, tokenizer.vocab_size, tokenizer.eot_id)
        for text in SAMPLES:
            assert loaded.encode(text) == tokenizer.encode(text)
            assert loaded.decode(loaded.encode(text)) == text
    assert make_tokenizer(str(path)).kind == kind


def test_the_byte_kind_saves_a_hugging_face_tokenizer_with_the_same_ids(tmp_path):
    path = make_tokenizer("byte").save(tmp_path)
    saved = hf.Tokenizer.from_file(str(path))  # tokenizers itself reads it
    every_byte = "".join(chr(i) for i in range(1, 128)) + "Āé😀漢字"
    for text in SAMPLES + [every_byte]:
        assert saved.encode(text, add_special_tokens=False).ids == list(text.encode("utf-8"))
        assert saved.decode(list(text.encode("utf-8"))) == text
    assert saved.get_vocab_size() == 256


def test_the_byte_kinds_old_file_still_loads(tmp_path):
    """Data folders prepared, and runs trained, before the byte kind was saved as a Hugging Face file."""
    (tmp_path / "tokenizer.json").write_text(json.dumps({"gigatrain_tokenizer": "byte", "vocab_size": 256}) + "\n")
    loaded = load_tokenizer(tmp_path)
    assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == ("byte", 256, 0)
    assert loaded.encode(SAMPLES[2]) == list(SAMPLES[2].encode("utf-8"))


def test_foreign_tokenizer_json_is_kind_json_and_round_trips(tmp_path):
    foreign = foreign_tokenizer(["<pad>", "</s>"])
    foreign.save(str(tmp_path / "tokenizer.json"))
    tokenizer = from_tokenizer_json(tmp_path / "tokenizer.json")
    assert tokenizer.kind == "json"
    assert tokenizer.eot_id == foreign.token_to_id("</s>") == 1
    assert tokenizer.vocab_size == foreign.get_vocab_size()
    for text in SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    saved = tokenizer.save(tmp_path / "copy")
    reloaded = load_tokenizer(saved.parent)
    assert (reloaded.kind, reloaded.eot_id, reloaded.vocab_size) == ("json", 1, tokenizer.vocab_size)
    assert reloaded.encode(SAMPLES[2]) == tokenizer.encode(SAMPLES[2])


def test_eot_prefers_endoftext_then_s(tmp_path):
    foreign = foreign_tokenizer(["</s>", "<|endoftext|>"])
    foreign.save(str(tmp_path / "tokenizer.json"))
    assert from_tokenizer_json(tmp_path / "tokenizer.json").eot_id == foreign.token_to_id("<|endoftext|>")


def test_truncation_in_a_foreign_tokenizer_is_switched_off(tmp_path):
    foreign = foreign_tokenizer(["</s>"])
    foreign.enable_truncation(max_length=4)
    foreign.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer(tmp_path)
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tokenizer.encode(text)) > 4
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_json_without_eot_names_what_it_looked_for(tmp_path):
    foreign_tokenizer(["<pad>"]).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=r"tokenizer\.json.*<\|endoftext\|>.*</s>.*<\|end_of_text\|>"):
        from_tokenizer_json(tmp_path / "tokenizer.json")


def test_bad_tokenizer_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_bad_spec_names_it_and_the_choices():
    with pytest.raises(DataError, match=r"'wordpiece'.*byte.*bpe.*tokenizer\.json") as error:
        make_tokenizer("wordpiece", [], 300)
    assert "\n" not in str(error.value)


# Letters, digits, punctuation, a contraction, and every kind of whitespace the BPE's regex
# treats specially (tabs, newlines, no-break and other Unicode spaces, and U+001C, which
# Python calls a space but the regex does not).
PIECE_ALPHABET = list("ab é漢0 9.,'s\t\n\r") + ["  ", "\u00a0", "\u3000", "\u2028", "\u001c", "😀", "'ll", " '"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECE_ALPHABET), max_size=80).map("".join), st.integers(2, 24))
def test_pieces_encode_to_the_whole_documents_tokens(bpe, text, max_chars):
    pieces = split_long_text(text, max_chars)
    assert "".join(pieces) == text and all(len(piece) <= max_chars for piece in pieces)
    hard_cut = any(not tokenizers_module._PIECE_BOUNDARY.match(piece) for piece in pieces[1:])
    if not hard_cut:  # every cut before " X": exactly the whole text's tokens
        chunked = [i for piece in pieces for i in bpe.hf.encode(piece, add_special_tokens=False).ids]
        assert chunked == bpe.hf.encode(text, add_special_tokens=False).ids


def test_a_run_without_boundaries_is_cut_hard():
    assert split_long_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert split_long_text("aaaa bbbb cccc dddd", 10) == ["aaaa bbbb", " cccc dddd"]
    assert split_long_text("short", 10) == ["short"]


def test_long_documents_are_encoded_in_pieces_with_the_same_tokens(bpe, monkeypatch):
    documents = [" ".join(CORPUS), "x" * 5, "", "Grüße  aus\tKöln " * 40]
    expected = []
    for text in documents:
        expected += [bpe.eot_id] + bpe.hf.encode(text, add_special_tokens=False).ids  # whole, unsplit
    monkeypatch.setattr(tokenizers_module, "PIECE_CHARS", 64)
    monkeypatch.setattr(tokenizers_module, "ENCODE_BATCH_CHARS", 300)  # many batches, cutting across documents
    assert len(bpe.pieces(documents[0])) > 100
    assert bpe.encode_documents(documents, np.dtype("<u2")).tolist() == expected


def test_bpe_training_sees_the_same_pieces(monkeypatch):
    texts = [" ".join(CORPUS)]
    whole = train_bpe(texts, vocab_size=400)
    monkeypatch.setattr(tokenizers_module, "PIECE_CHARS", 64)
    assert train_bpe(texts, vocab_size=400).hf.to_str() == whole.hf.to_str()  # pre-token counts are unchanged


def test_only_byte_level_tokenizers_are_cut(tmp_path, bpe):
    assert len(bpe.pieces("word " * 50_000)) > 1
    foreign = foreign_tokenizer(["</s>"])  # ByteLevel too: cut like ours
    foreign.save(str(tmp_path / "bytelevel.json"))
    assert len(load_tokenizer(tmp_path / "bytelevel.json").pieces("word " * 50_000)) > 1
    vocab = {"</s>": 0, "[UNK]": 1, "word": 2}
    word_level = hf.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()  # its boundaries are not ours to guess
    word_level.save(str(tmp_path / "words.json"))
    assert load_tokenizer(tmp_path / "words.json").pieces("word " * 50_000) == ["word " * 50_000]
    prefixed = foreign_tokenizer(["</s>"])
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # every piece would gain a space
    prefixed.save(str(tmp_path / "prefixed.json"))
    assert len(load_tokenizer(tmp_path / "prefixed.json").pieces("word " * 50_000)) == 1


# Training a BPE on, then encoding, one line of 1.7 MB; prints the growth of peak RSS in MB.
# Whole, it grew by 342 MB (170 training, the rest encoding); in pieces, by 56 MB.
LONG_LINE_MEMORY = textwrap.dedent("""
    import resource
    import numpy as np
    from gigatrain.data.tokenizers import train_bpe
    words = "the of and to in is for on that with as by at from data model token 12345 {});".split()
    line = " ".join(words[(i * 7919) % len(words)] for i in range(400_000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokenizer = train_bpe([line], 300)
    tokens = tokenizer.encode_documents([line], np.uint16)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")


def test_a_long_line_is_tokenized_in_bounded_memory():
    result = subprocess.run([sys.executable, "-c", LONG_LINE_MEMORY], capture_output=True, text=True, check=True)
    assert int(result.stdout) < 150
