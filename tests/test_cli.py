"""The command line as a user meets it: subprocesses of `python -m gigatrain`."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, TINY, run_cli
from gigatrain.checkpoint import dcp as checkpoint
from gigatrain.fault import EXIT_REQUEUE
from gigatrain.data.tokenizers import load_tokenizer
from gigatrain.metrics.logger import read_metrics


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("args, words", [
    (["train", "--train.lrr=0.1"], ["train.lrr"]),
    (["train", "--train.max_steps=many"], ["train.max_steps", "integer"]),
    (["train", "--model.preset=huge"], ["model.preset", "tiny"]),
    (["train", "--train.schedule=step"], ["train.schedule", "cosine"]),
    (["train", "--train.lr"], ["--section.key=value"]),
    (["train", "missing.toml"], ["missing.toml"]),
    (["train", "--data.path=/nonexistent/data", "--model.preset=tiny"], ["/nonexistent/data"]),
    (["eval", "/nonexistent/run", "--text", "x.txt"], ["/nonexistent/run"]),
    (["prepare", "/nonexistent/corpus", "--out", "/tmp/never"], ["/nonexistent/corpus"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_bad_input_is_one_line_exit_2(args, words):
    assert_one_line_error(run_cli(*args), *words)


def test_corrupted_shard_is_refused_by_train(tmp_path, byte_data):
    data = tmp_path / "data"
    shutil.copytree(byte_data, data)
    shard = sorted(data.glob("train_*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    result = run_cli("train", *TINY, f"--data.path={data}", f"--run.dir={tmp_path / 'run'}")
    assert_one_line_error(result, shard.name)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_prepare_train_eval_generate_report(tmp_path, corpus, heldout):
    data = tmp_path / "data"
    prepared = run_cli("prepare", str(corpus), "--val", str(heldout), "--tokenizer", "bpe", "--vocab-size", "400",
                       "--out", str(data), check=True)
    assert "train:" in prepared.stdout and (data / "manifest.json").exists()
    run_dir = tmp_path / "run"
    run_cli("train", *TINY, f"--data.path={data}", f"--run.dir={run_dir}", "--train.max_steps=20", check=True)
    evaluated = run_cli("eval", str(run_dir), "--text", str(heldout), check=True)
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["step"] == 20 and math.isfinite(result["loss"]) and math.isfinite(result["bits_per_byte"])
    sample = run_cli("generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "20", check=True)
    assert sample.stdout.startswith("def ")
    report = run_cli("report", str(run_dir), check=True)
    assert "final_loss" in report.stdout and (run_dir / "loss.png").exists()


def test_bits_per_byte_is_tokenizer_independent(tmp_path, byte_data, bpe_data, heldout):
    """The same held-out text, a byte-level run and a BPE run: each one's bits per byte is its
    total code length over the text's bytes, and agrees with the trainer's own val_bpb."""
    documents = [p.read_text() for p in sorted(heldout.iterdir())]
    n_bytes = sum(len(d.encode()) for d in documents) + len(documents) - 1  # + separators between documents
    results = {}
    for name, data in (("byte", byte_data), ("bpe", bpe_data)):
        run_dir = tmp_path / name
        run_cli("train", *TINY, f"--data.path={data}", f"--run.dir={run_dir}", "--train.max_steps=30",
                "--train.eval_batches=1000", "--train.batch_size=4", check=True)
        result = json.loads(run_cli("eval", str(run_dir), "--text", str(heldout), check=True).stdout.splitlines()[-1])
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
        n_tokens = sum(len(tokenizer.encode(d)) + 1 for d in documents) - 1
        assert result["bytes"] == n_bytes and result["tokens"] == n_tokens
        assert result["bits_per_byte"] == pytest.approx(result["loss"] * n_tokens / (math.log(2) * n_bytes), rel=1e-9)
        trainer_bpb = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_bpb" in r][-1]["val_bpb"]
        # The trainer evaluates the prepared val split (the same text) in its own windows.
        assert result["bits_per_byte"] == pytest.approx(trainer_bpb, rel=0.02)
        results[name] = result
    assert results["byte"]["tokens"] == n_bytes  # byte level: a token per byte, so bpb = loss / ln 2
    assert results["bpe"]["tokens"] < 0.6 * n_bytes
    assert results["byte"]["bits_per_byte"] == pytest.approx(results["byte"]["loss"] / math.log(2), rel=1e-6)


def test_sigterm_saves_a_checkpoint_exits_for_requeue_and_resume_finishes(tmp_path, byte_data):
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "gigatrain", "train", *TINY, f"--data.path={byte_data}",
                                f"--run.dir={run_dir}", "--train.max_steps=100000", "--train.checkpoint_every=100000"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(read_metrics(run_dir / "metrics.jsonl")) < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_REQUEUE, stderr
    last_step = read_metrics(run_dir / "metrics.jsonl")[-1]["step"]
    assert checkpoint.latest(run_dir / "checkpoints").name == f"step_{last_step:08d}"
    run_cli("train", f"--run.dir={run_dir}", f"--train.max_steps={last_step + 3}", check=True)
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, last_step + 4))


def test_default_corpus_with_no_data_path(tmp_path, isolated_cache):
    """No data.path: the standard library's sources are prepared on first use and trained on."""
    run_dir = tmp_path / "run"
    result = run_cli("train", *TINY, "--data.tokenizer=byte", f"--run.dir={run_dir}", "--train.max_steps=3",
                     "--train.samples=1", "--train.sample_tokens=8", check=True)
    assert "stopped by max_steps at step 3" in result.stdout
    assert "prompt 'def'" in (run_dir / "samples.txt").read_text()
    assert json.loads((run_dir / "run.json").read_text())["data"].startswith(str(isolated_cache))
