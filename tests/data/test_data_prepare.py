"""prepare: sources, splits, shards, manifest, atomic output, the default corpus."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers as hf
from tokenizers import models, pre_tokenizers

import gigatrain.data.prepare as prepare_module
from gigatrain.cli import run as cli_run
from gigatrain.data import DataError, default_corpus_files, ensure_default_data, load_tokenizer
from gigatrain.data.prepare import prepare, token_dtype, val_score


def doc_text(i: int) -> str:
    return f"Document {i}: Grüße 😀 " + "lorem ipsum dolor sit amet " * (i % 5 + 1) + "\n"


def make_corpus(folder: Path, count: int = 40) -> dict[str, str]:
    """count text files (two levels deep) plus files prepare must ignore; returns key -> text."""
    texts = {}
    for i in range(count):
        key = f"part{i % 2}/doc_{i:03d}.txt"
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_text(doc_text(i), encoding="utf-8")
        texts[key] = doc_text(i)
    (folder / "image.png").write_bytes(b"\x89PNG\x00\x00")  # unsupported suffix
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "secret.txt").write_text("hidden")
    (folder / "empty.txt").write_text("")  # empty: no document
    return texts


def shard_tokens(out: Path, manifest: dict, split: str) -> np.ndarray:
    files = [out / shard["file"] for shard in manifest["splits"][split]["shards"]]
    return np.concatenate([np.fromfile(file, dtype=np.dtype(manifest["dtype"]).newbyteorder("<")) for file in files])


def byte_stream(texts: list[str]) -> list[int]:
    stream = []
    for text in texts:
        stream += [0] + list(text.encode("utf-8"))
    return stream


def documents_of(stream: np.ndarray) -> set[str]:
    """Split a byte-tokenizer stream back into its documents."""
    return {part.decode("utf-8") for part in stream.astype(np.uint8).tobytes().split(b"\x00")[1:]}


def test_folder_with_byte_tokenizer_gives_exact_streams(tmp_path):
    texts = make_corpus(tmp_path / "corpus")
    manifest = prepare([str(tmp_path / "corpus")], tmp_path / "out", tokenizer="byte", val_fraction=0.2, seed=3)
    out = tmp_path / "out"
    is_val = {key: val_score(key, 3) < 0.2 for key in texts}
    assert 0 < sum(is_val.values()) < len(texts)
    for split, want_val in (("train", False), ("val", True)):
        docs = [texts[key] for key in sorted(texts) if is_val[key] == want_val]
        entry = manifest["splits"][split]
        assert shard_tokens(out, manifest, split).tolist() == byte_stream(docs)
        assert entry["documents"] == len(docs)
        assert entry["tokens"] == sum(len(doc.encode()) + 1 for doc in docs)
        assert entry["bytes"] == sum(len(doc.encode()) for doc in docs)
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"] == {"kind": "byte", "vocab_size": 256, "eot_id": 0, "file": "tokenizer.json"}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert load_tokenizer(out).kind == "byte"


def test_bpe_manifest_matches_files_and_encoded_documents(tmp_path):
    texts = make_corpus(tmp_path / "corpus")
    manifest = prepare([str(tmp_path / "corpus")], tmp_path / "out", vocab_size=300, val_fraction=0.2, shard_tokens=500)
    out = tmp_path / "out"
    tokenizer = load_tokenizer(out)
    assert (tokenizer.kind, tokenizer.vocab_size) == ("bpe", 300)
    assert manifest["tokenizer"]["vocab_size"] == 300 and manifest["dtype"] == "uint16"
    total_tokens = sum(len(tokenizer.encode(text)) + 1 for text in texts.values())
    assert manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"] == total_tokens
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        shards = entry["shards"]
        assert [shard["file"] for shard in shards] == [f"{split}_{i:06d}.bin" for i in range(len(shards))]
        assert all(shard["tokens"] == 500 for shard in shards[:-1]) and 0 < shards[-1]["tokens"] <= 500
        assert sum(shard["tokens"] for shard in shards) == entry["tokens"]
        for shard in shards:
            data = (out / shard["file"]).read_bytes()
            assert len(data) == shard["tokens"] * 2
            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert len(manifest["splits"]["train"]["shards"]) > 1
    # The stream decodes back to the documents.
    decoded = tokenizer.decode(shard_tokens(out, manifest, "train").tolist()).split("<|endoftext|>")
    assert decoded[0] == "" and set(decoded[1:]) <= set(texts.values())


def test_prepare_is_deterministic(tmp_path):
    make_corpus(tmp_path / "corpus")
    for out in ("a", "b"):
        prepare([str(tmp_path / "corpus")], tmp_path / out, vocab_size=300, shard_tokens=400)
    files_a = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert files_a == sorted(path.name for path in (tmp_path / "b").iterdir())
    for name in files_a:
        if name != "manifest.json":  # it holds the creation time
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    manifest_a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest_b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest_a["splits"] == manifest_b["splits"]


def test_adding_a_file_does_not_move_other_documents(tmp_path):
    texts = make_corpus(tmp_path / "corpus", count=60)
    first = prepare([str(tmp_path / "corpus")], tmp_path / "a", tokenizer="byte", val_fraction=0.2)
    (tmp_path / "corpus" / "new.txt").write_text("a brand new document")
    second = prepare([str(tmp_path / "corpus")], tmp_path / "b", tokenizer="byte", val_fraction=0.2)
    old_val = documents_of(shard_tokens(tmp_path / "a", first, "val"))
    new_val = documents_of(shard_tokens(tmp_path / "b", second, "val")) - {"a brand new document"}
    assert old_val == new_val and 0 < len(old_val) < len(texts)
    # Moving the folder (same relative layout) keeps the split too.
    (tmp_path / "corpus").rename(tmp_path / "moved")
    third = prepare([str(tmp_path / "moved")], tmp_path / "c", tokenizer="byte", val_fraction=0.2)
    assert third["splits"] == second["splits"]


def test_glob_patterns(tmp_path):
    texts = make_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "notes.md").write_text("markdown notes")
    manifest = prepare([str(tmp_path / "corpus" / "part0" / "*.txt")], tmp_path / "a", tokenizer="byte")
    part0 = [text for key, text in texts.items() if key.startswith("part0/")]
    assert sum(manifest["splits"][split]["documents"] for split in ("train", "val")) == len(part0)
    manifest = prepare([str(tmp_path / "corpus" / "**")], tmp_path / "b", tokenizer="byte")
    # Every supported, non-empty file at any depth (glob itself skips hidden names).
    assert sum(manifest["splits"][split]["documents"] for split in ("train", "val")) == len(texts) + 1
    with pytest.raises(DataError, match=r"\*\.nothing"):
        prepare([str(tmp_path / "corpus" / "*.nothing")], tmp_path / "c", tokenizer="byte")


def test_same_file_from_two_sources_is_read_once(tmp_path):
    texts = make_corpus(tmp_path / "corpus")
    sources = [str(tmp_path / "corpus"), str(tmp_path / "corpus" / "part0" / "*.txt")]
    manifest = prepare(sources, tmp_path / "out", tokenizer="byte")
    assert sum(manifest["splits"][split]["documents"] for split in ("train", "val")) == len(texts)


def test_jsonl_source(tmp_path):
    lines = [{"content": f"record {i} ✓", "id": i} for i in range(30)] + [{"content": None}, {"content": ""}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    manifest = prepare([str(path)], tmp_path / "out", tokenizer="byte", text_field="content", val_fraction=0.2)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 30
    streams = {split: documents_of(shard_tokens(tmp_path / "out", manifest, split)) for split in ("train", "val")}
    assert streams["train"] | streams["val"] == {f"record {i} ✓" for i in range(30)}
    assert not streams["train"] & streams["val"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:3: no 'text' field \(has: body\)"):
        prepare([str(path)], tmp_path / "out", tokenizer="byte")
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:2: not valid JSON"):
        prepare([str(path)], tmp_path / "out", tokenizer="byte")
    path.write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:2: .*int"):
        prepare([str(path)], tmp_path / "out", tokenizer="byte")


def test_parquet_source(tmp_path):
    texts = [f"row {i} — ünïcode" for i in range(25)] + [None]
    pq.write_table(pa.table({"id": list(range(26)), "body": texts}), tmp_path / "rows.parquet")
    manifest = prepare([str(tmp_path / "rows.parquet")], tmp_path / "out", tokenizer="byte", text_field="body", val_fraction=0.3)
    streams = {split: documents_of(shard_tokens(tmp_path / "out", manifest, split)) for split in ("train", "val")}
    assert streams["train"] | streams["val"] == set(texts[:-1])
    assert streams["train"] and streams["val"]
    with pytest.raises(DataError, match=r"rows\.parquet has no column 'text' \(columns: id, body\)"):
        prepare([str(tmp_path / "rows.parquet")], tmp_path / "out2", tokenizer="byte")


def test_explicit_val_sources(tmp_path):
    train_texts = make_corpus(tmp_path / "train")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a.txt").write_text("validation one")
    (tmp_path / "val" / "b.md").write_text("validation two")
    manifest = prepare([str(tmp_path / "train")], tmp_path / "out", val_sources=[str(tmp_path / "val")], tokenizer="byte")
    assert shard_tokens(tmp_path / "out", manifest, "val").tolist() == byte_stream(["validation one", "validation two"])
    assert manifest["splits"]["train"]["documents"] == len(train_texts)
    assert manifest["val_sources"] == [str(tmp_path / "val")] and manifest["val_fraction"] is None
    with pytest.raises(DataError, match=r"doc_000\.txt is in both"):
        prepare([str(tmp_path / "train")], tmp_path / "out2", val_sources=[str(tmp_path / "train" / "part0")], tokenizer="byte")


def test_bpe_is_trained_on_train_documents_only(tmp_path):
    make_corpus(tmp_path / "train")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "v.txt").write_text("zqxj zqxj zqxj zqxj zqxj zqxj zqxj zqxj " * 50)
    prepare([str(tmp_path / "train")], tmp_path / "out", val_sources=[str(tmp_path / "val")], vocab_size=400)
    tokenizer = load_tokenizer(tmp_path / "out")
    assert "zqxj" not in tokenizer.hf.get_vocab() and "Ġzqxj" not in tokenizer.hf.get_vocab()


def test_tiny_corpus_still_gets_one_val_document(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    for fraction in (0.001, 0.999):
        manifest = prepare([str(tmp_path)], tmp_path / f"out{fraction}", tokenizer="bpe", vocab_size=300, val_fraction=fraction)
        assert manifest["splits"]["train"]["documents"] == manifest["splits"]["val"]["documents"] == 1
    (tmp_path / "b.txt").unlink()
    with pytest.raises(DataError, match=r"single document: a validation split needs at least two; pass --val SOURCE"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "one", tokenizer="byte")


def test_user_errors(tmp_path):
    with pytest.raises(DataError, match="no sources"):
        prepare([], tmp_path / "out")
    with pytest.raises(DataError, match="nope.txt does not exist"):
        prepare([str(tmp_path / "nope.txt")], tmp_path / "out")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match=r"folder .*bin has no files"):
        prepare([str(tmp_path / "bin")], tmp_path / "out")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no train documents"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "out", tokenizer="byte")
    with pytest.raises(DataError, match="val-fraction"):
        prepare([str(tmp_path / "bin")], tmp_path / "out", val_fraction=1.5)
    assert not (tmp_path / "out").exists()


def test_overwrite_rules(tmp_path):
    make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    prepare([str(tmp_path / "corpus")], out, tokenizer="byte")
    with pytest.raises(DataError, match="--overwrite"):
        prepare([str(tmp_path / "corpus")], out, tokenizer="byte")
    manifest = prepare([str(tmp_path / "corpus")], out, tokenizer="byte", seed=7, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 7 == manifest["seed"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not a gigatrain data folder"):
        prepare([str(tmp_path / "corpus")], tmp_path / "mine", tokenizer="byte", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    prepare([str(tmp_path / "corpus")], tmp_path / "empty", tokenizer="byte")
    assert (tmp_path / "empty" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "empty", "mine", "out"]  # no temp folders left


def test_failed_prepare_leaves_nothing_behind(tmp_path):
    make_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "zz.jsonl").write_text('{"text": "ok"}\n{"oops": 1}\n')  # fails last
    with pytest.raises(DataError, match=r"zz\.jsonl:2"):
        prepare([str(tmp_path / "corpus")], tmp_path / "data" / "out", tokenizer="byte")
    assert list((tmp_path / "data").iterdir()) == []


def test_large_vocabulary_uses_uint32(tmp_path):
    assert token_dtype(256) == token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")
    vocab = {"</s>": 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    tokenizer = hf.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("w69999 w5 w0")
    (tmp_path / "b.txt").write_text("w1 w2")
    manifest = prepare([str(tmp_path / "a.txt")], tmp_path / "out", val_sources=[str(tmp_path / "b.txt")], tokenizer=str(tmp_path / "tokenizer.json"))
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["kind"] == "json"
    assert shard_tokens(tmp_path / "out", manifest, "train").tolist() == [0, 70001, 7, 2]


def fake_stdlib(root: Path) -> None:
    for relative in ["os.py", "json/__init__.py", "json/decoder.py", "test/test_os.py", "idlelib/idle_test/t.py",
                     "site-packages/pkg/mod.py", "lib2to3/tests/x.py", "README.txt"]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(f"# {relative}\nprint('hello from {relative}')\n" * 3)


def test_default_corpus_files_skip_tests_and_packages(tmp_path, monkeypatch):
    fake_stdlib(tmp_path / "lib")
    monkeypatch.setattr(prepare_module, "_stdlib_dir", lambda: tmp_path / "lib")
    assert [path.relative_to(tmp_path / "lib").as_posix() for path in default_corpus_files()] == [
        "json/__init__.py",
        "json/decoder.py",
        "os.py",
    ]


def test_real_stdlib_corpus_is_found():
    files = default_corpus_files()
    assert len(files) > 100 and files == sorted(files)
    assert any(path.name == "os.py" for path in files)
    assert not any({"test", "tests", "site-packages", "idle_test"} & set(path.parts) for path in files)


def test_ensure_default_data_builds_once(tmp_path, monkeypatch):
    fake_stdlib(tmp_path / "lib")
    monkeypatch.setattr(prepare_module, "_stdlib_dir", lambda: tmp_path / "lib")
    folder = ensure_default_data(tmp_path / "cache", tokenizer="byte")
    assert folder.parent == tmp_path / "cache" and "byte" in folder.name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 3
    created = (folder / "manifest.json").stat().st_mtime_ns
    assert ensure_default_data(tmp_path / "cache", tokenizer="byte") == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == created  # reused, not rebuilt
    other = ensure_default_data(tmp_path / "cache", tokenizer="bpe", vocab_size=300)
    assert other != folder and "bpe300" in other.name


def test_ensure_default_data_loser_of_a_race_uses_the_winners_folder(tmp_path, monkeypatch):
    fake_stdlib(tmp_path / "lib")
    monkeypatch.setattr(prepare_module, "_stdlib_dir", lambda: tmp_path / "lib")
    real_build = prepare_module._build
    winner = {}

    def build_while_another_process_wins(*args, **kwargs):
        if not winner:  # the "other process" runs to completion in the middle of our build
            winner["started"] = True
            winner["folder"] = folder = ensure_default_data(tmp_path / "cache", tokenizer="byte")
            winner["manifest"] = (folder / "manifest.json").read_bytes()
        return real_build(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_build", build_while_another_process_wins)
    folder = ensure_default_data(tmp_path / "cache", tokenizer="byte")
    assert folder == winner["folder"]
    assert (folder / "manifest.json").read_bytes() == winner["manifest"]  # the winner's folder, untouched
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [folder.name]  # loser's temp folder removed


def prepare_cli(args: list[str], capsys) -> tuple[int, str]:
    """`gigatrain prepare ARGS` in this process: exit code and stderr."""
    code = cli_run(["prepare", *args])
    return code, capsys.readouterr().err


def test_overwrite_never_deletes_a_folder_prepare_did_not_write(tmp_path, capsys):
    make_corpus(tmp_path / "corpus")
    webapp = tmp_path / "webapp"  # a manifest.json, but not ours
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "x"}')
    (webapp / "index.html").write_text("precious")
    for overwrite in ([], ["--overwrite"]):
        code, err = prepare_cli([str(tmp_path / "corpus"), "--out", str(webapp), "--tokenizer", "byte", *overwrite], capsys)
        assert code == 2 and err.startswith("gigatrain: error: ") and err.count("\n") == 1
        assert "not a gigatrain data folder" in err and "--out" in err
    assert (webapp / "index.html").read_text() == "precious"
    # Our own data with a user's file added: not only ours any more, so not replaced either.
    out = tmp_path / "out"
    prepare([str(tmp_path / "corpus")], out, tokenizer="byte")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"not a gigatrain data folder \(it holds notes\.txt\)"):
        prepare([str(tmp_path / "corpus")], out, tokenizer="byte", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "train_000000.bin").is_file()


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    make_corpus(tmp_path / "corpus")
    # The first shard goes to /dev/full, where every write fails with a real ENOSPC.
    monkeypatch.setattr(prepare_module.ShardWriter, "_file_name", lambda self: "/dev/full")
    code, err = prepare_cli([str(tmp_path / "corpus"), "--out", str(tmp_path / "data" / "out"), "--tokenizer", "byte"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"gigatrain: error: no space left on the device holding {tmp_path / 'data'}")
    assert list((tmp_path / "data").iterdir()) == []


def scratch_folders(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if path.name.startswith(".out."))


# A prepare that stops in its first shard write: killed by SIGKILL ("kill"), or, as
# `gigatrain prepare`, waiting there for a SIGTERM ("wait").
STOPPED_PREPARE = textwrap.dedent("""
    import os, signal, sys, time
    import gigatrain.data.prepare as prepare_module
    from gigatrain.cli import main
    mode, source, out = sys.argv[1:]
    def write(self, tokens):
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print("writing", flush=True)
        time.sleep(60)
    prepare_module.ShardWriter.write = write
    if mode == "kill":
        prepare_module.prepare([source], out, tokenizer="byte")
    sys.argv[1:] = ["prepare", source, "--out", out, "--tokenizer", "byte"]
    main()
""")


def test_a_killed_prepare_leaves_nothing_after_the_next_run(tmp_path):
    make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    command = [sys.executable, "-c", STOPPED_PREPARE, "kill", str(tmp_path / "corpus"), str(out)]
    assert subprocess.run(command).returncode == -signal.SIGKILL
    stale = scratch_folders(tmp_path)
    assert len(stale) == 1 and (tmp_path / stale[0] / "tokenizer.json").is_file()
    host = socket.gethostname()
    running = tmp_path / f".out.tmp-{host}-{os.getpid()}-0123abcd"  # a concurrent prepare (this process is alive)
    elsewhere = tmp_path / ".out.tmp-other-host-1-0123abcd"  # another host's: its pid means nothing here
    not_ours = tmp_path / f".out.tmp-{host}-999999999-0123abcd"  # our name, but a user's file inside
    for folder in (running, elsewhere, not_ours):
        folder.mkdir()
    (not_ours / "thesis.tex").write_text("precious")
    prepare([str(tmp_path / "corpus")], out, tokenizer="byte")
    assert scratch_folders(tmp_path) == sorted(folder.name for folder in (running, elsewhere, not_ours))


def test_sigterm_removes_the_temporary_folder(tmp_path):
    make_corpus(tmp_path / "corpus")
    command = [sys.executable, "-c", STOPPED_PREPARE, "wait", str(tmp_path / "corpus"), str(tmp_path / "out")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    assert len(scratch_folders(tmp_path)) == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert scratch_folders(tmp_path) == [] and not (tmp_path / "out").exists()


def test_binary_files_are_refused_by_name(tmp_path):
    make_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DataError, match=r"photo\.txt is not a text file \(it holds NUL bytes\)"):
        prepare([str(tmp_path / "corpus")], tmp_path / "out", tokenizer="byte")
    assert not (tmp_path / "out").exists()


def test_vocab_size_is_refused_for_fixed_vocabularies(tmp_path, capsys):
    make_corpus(tmp_path / "corpus")
    code, err = prepare_cli([str(tmp_path / "corpus"), "--out", str(tmp_path / "out"), "--tokenizer", "byte",
                             "--vocab-size", "100"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "--vocab-size 100 applies only to --tokenizer bpe" in err and "fixed at 256" in err
    assert not (tmp_path / "out").exists()
    assert prepare([str(tmp_path / "corpus")], tmp_path / "out", tokenizer="byte")["tokenizer"]["vocab_size"] == 256


def test_a_skewed_split_warns(tmp_path, capsys):
    keys = [f"docs.jsonl:{line}" for line in range(1, 41)]
    big = next(key for key in keys if val_score(key, 0) < 0.05)  # a val document, made 100 times longer
    lines = [{"text": ("long " * 500 if key == big else "short doc " * 2)} for key in keys]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    manifest = prepare([str(tmp_path / "docs.jsonl")], tmp_path / "out", tokenizer="byte", val_fraction=0.05)
    share = manifest["splits"]["val"]["tokens"] / sum(manifest["splits"][split]["tokens"] for split in ("train", "val"))
    assert share > 0.5
    err = capsys.readouterr().err
    assert err.startswith(f"gigatrain: warning: the validation split holds {share:.1%} of the tokens") and err.count("\n") == 1
    assert "--val-fraction 0.05" in err and "--val SOURCE" in err
