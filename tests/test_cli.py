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
from gigatrain.cli import run as cli_run
from gigatrain.fault import EXIT_REQUEUE
from gigatrain.data.tokenizers import load_tokenizer
from gigatrain.rundir import RunDir


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("args, words", [
    (["train", "--train.lrr=0.1"], ["train.lrr"]),
    (["eval", "/nonexistent/run", "--text", "x.txt"], ["/nonexistent/run"]),
    (["prepare", "/nonexistent/corpus", "--out", "/tmp/never"], ["/nonexistent/corpus"]),
])
def test_bad_input_is_one_line_exit_2(args, words):
    """As a user meets it, a process of its own for each command: whatever the command imports
    adds nothing to the one line."""
    assert_one_line_error(run_cli(*args), *words)


@pytest.mark.parametrize("args, words", [
    (["train", "--train.max_steps=many"], ["train.max_steps", "integer"]),
    (["train", "--model.preset=huge"], ["model.preset", "tiny"]),
    (["train", "--train.schedule=step"], ["train.schedule", "cosine"]),
    (["train", "--train.lr"], ["--section.key=value"]),
    (["train", "missing.toml"], ["missing.toml"]),
    (["train", "--data.path=/nonexistent/data", "--model.preset=tiny"], ["/nonexistent/data"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_more_bad_input_is_one_line_exit_2(capsys, args, words):
    """Through the same entry point in this process: the cases above start each command's
    process once; a new process per bad value would test the same code again (2-3 s each)."""
    code, out, err = run_here(capsys, *args)
    assert_one_line_error(subprocess.CompletedProcess(args, code, out, err), *words)


def test_corrupted_shard_is_refused_by_train(tmp_path, byte_data):
    data = tmp_path / "data"
    shutil.copytree(byte_data, data)
    shard = sorted(data.glob("train_*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    result = run_cli("train", *TINY, f"--data.path={data}", f"--run.dir={tmp_path / 'run'}")
    assert_one_line_error(result, shard.name)
    assert not RunDir(tmp_path / "run").checkpoints.exists()


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
    assert "final_loss" in report.stdout and RunDir(run_dir).loss_plot.exists()


def test_bits_per_byte_is_tokenizer_independent(tmp_path, byte_data, bpe_data, heldout, capsys):
    """The same held-out text, a byte-level run and a BPE run: each one's bits per byte is its
    total code length over the text's bytes, and agrees with the trainer's own val_bpb. (In this
    process: `gigatrain` as a program runs in test_prepare_train_eval_generate_report.)"""
    documents = [p.read_text() for p in sorted(heldout.iterdir())]
    n_bytes = sum(len(d.encode()) for d in documents) + len(documents) - 1  # + separators between documents
    results = {}
    for name, data in (("byte", byte_data), ("bpe", bpe_data)):
        run_dir = tmp_path / name
        assert cli_run(["train", *TINY, f"--data.path={data}", f"--run.dir={run_dir}", "--train.max_steps=30",
                        "--train.eval_batches=1000", "--train.batch_size=4", "--train.samples=0"]) == 0
        capsys.readouterr()
        assert cli_run(["eval", str(run_dir), "--text", str(heldout)]) == 0
        result = json.loads(capsys.readouterr().out.splitlines()[-1])
        tokenizer = load_tokenizer(RunDir(run_dir).tokenizer)
        n_tokens = sum(len(tokenizer.encode(d)) + 1 for d in documents) - 1
        assert result["bytes"] == n_bytes and result["tokens"] == n_tokens
        assert result["bits_per_byte"] == pytest.approx(result["loss"] * n_tokens / (math.log(2) * n_bytes), rel=1e-9)
        trainer_bpb = [r for r in RunDir(run_dir).metrics_records() if "val_bpb" in r][-1]["val_bpb"]
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
    while len(RunDir(run_dir).metrics_records()) < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_REQUEUE, stderr
    last_step = RunDir(run_dir).metrics_records()[-1]["step"]
    assert checkpoint.latest(RunDir(run_dir).checkpoints).name == f"step_{last_step:08d}"
    run_cli("train", f"--run.dir={run_dir}", f"--train.max_steps={last_step + 3}", check=True)
    steps = [r["step"] for r in RunDir(run_dir).metrics_records() if "loss" in r]
    assert steps == list(range(1, last_step + 4))


def test_default_corpus_with_no_data_path(tmp_path, isolated_cache):
    """No data.path: the standard library's sources are prepared on first use and trained on."""
    run_dir = tmp_path / "run"
    result = run_cli("train", *TINY, "--data.tokenizer=byte", f"--run.dir={run_dir}", "--train.max_steps=3",
                     "--train.samples=1", "--train.sample_tokens=8", check=True)
    assert "stopped by max_steps at step 3" in result.stdout
    assert "prompt 'def'" in RunDir(run_dir).samples.read_text()
    assert RunDir(run_dir).read_run_info()["data"].startswith(str(isolated_cache))


# -- arguments checked before anything loads (in this process: nothing but parsing runs) -------------
def run_here(capsys, *args: str) -> tuple[int, str, str]:
    """`gigatrain ARGS` through the CLI's own entry point in this process: exit code, stdout, stderr."""
    try:
        code = cli_run(list(args))
    except SystemExit as done:  # --help
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gigatrain: error: "), err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("args, words", [
    (["--temperature", "-1"], ["--temperature", "-1", "0 (greedy"]),
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--top-k", "-5"], ["--top-k", "-5", "0 (no top-k"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", "1 or more"]),
    (["--num-samples", "0"], ["--num-samples", "1 or more"]),
])
def test_generate_refuses_values_it_cannot_sample_with(capsys, tmp_path, args, words):
    """These used to print the prompt (or spaces) and exit 0; the run is never loaded."""
    assert_usage_error(*run_here(capsys, "generate", str(tmp_path / "no-run"), *args)[::2], *words)


def test_eval_refuses_an_empty_batch(capsys, tmp_path):
    assert_usage_error(*run_here(capsys, "eval", str(tmp_path), "--text", "x", "--batch-size", "0")[::2], "--batch-size")


def test_temperature_zero_is_greedy_and_top_k_zero_is_off(tiny_run, capsys):
    """Temperature 0: the likeliest token each time, whatever the seed; what the model itself
    ranks highest, decoded step by step here."""
    import torch

    from gigatrain.train.checkpointing import load_run

    greedy = ["generate", str(tiny_run), "--prompt", "def", "--temperature", "0", "--top-k", "0", "--max-new-tokens", "12",
              "--device", "cpu"]
    texts = [run_cli(*greedy, "--seed", "0", check=True).stdout]
    code, out, err = run_here(capsys, *greedy, "--seed", "1")  # the same entry point, in this process
    assert code == 0, err
    texts.append(out)
    assert texts[0] == texts[1]
    run = load_run(tiny_run, torch.device("cpu"))
    ids = [run.tokenizer.eot_id, *run.tokenizer.encode("def")]
    prompt_length = len(ids)
    with torch.no_grad():
        for _ in range(12):
            next_id = int(run.model(torch.tensor([ids[-run.cfg.data.seq_len:]]))[0, -1].argmax())
            if next_id == run.tokenizer.eot_id:
                break
            ids.append(next_id)
    assert texts[0] == "def" + run.tokenizer.decode(ids[prompt_length:]) + "\n"


@pytest.mark.parametrize("args, fix", [
    (["train", "--train.max_steps", "10"], "--train.max_steps=10"),
    (["train", "configs/tiny.toml", "--run.dir", "runs/x"], "--run.dir=runs/x"),
    (["launch", "slurm", "--nodes", "1", "--gpus-per-node", "1", "--train.lr", "-1", "configs/tiny.toml"], "--train.lr=-1"),
])
def test_an_override_written_with_a_space_suggests_the_equals_form(capsys, args, fix):
    """`--train.max_steps 10` used to end in "config file '10' does not exist"."""
    code, _, err = run_here(capsys, *args)
    assert_usage_error(code, err, fix)
    assert "does not exist" not in err


def test_train_help_lists_every_config_key_with_its_default(capsys):
    import dataclasses

    from gigatrain.config import Config, load_config

    code, out, _ = run_here(capsys, "train", "--help")
    assert code == 0
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  ") and "." in line.split()[0]}
    plain = load_config()  # a plain `gigatrain train`: the default preset's recipe included
    assert lines["train.optimizer"] == '"muon"'
    for section in dataclasses.fields(Config):
        for key in dataclasses.fields(section.default_factory()):
            default = getattr(getattr(plain, section.name), key.name)
            if default is None:
                shown = "(unset)"
            elif isinstance(default, (bool, str)):
                shown = json.dumps(default)  # true, false, "text": as in TOML
            else:
                shown = str(default)
            assert lines.get(f"{section.name}.{key.name}") == shown, f"{section.name}.{key.name} in train --help"


@pytest.mark.parametrize("command", ["eval", "generate", "export", "import", "report", "lighthouse"])
def test_help_explains_every_option_and_shows_its_default(capsys, command):
    import argparse

    from gigatrain.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    code, out, _ = run_here(capsys, command, "--help")
    assert code == 0 and sub.description and sub.description.split(";")[0].split(":")[0] in " ".join(out.split())
    text = " ".join(out.split())  # help lines are wrapped
    for action in sub._actions:
        assert action.help, f"{command} {action.dest} has no help"
        if action.option_strings and action.default not in (None, "", False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, f"{command} {action.option_strings[0]}'s default"


# -- train --dry-run -----------------------------------------------------------------------------------
def test_dry_run_names_batch_sizes_that_fit_the_world_size(capsys, tmp_path):
    """The 1B GPU config (micro-batch 4) on 32 GPUs: 16 does not split; the error names the sizes
    that do, and each of them passes."""
    config = str(REPO / "configs" / "llama3-1b-gpu.toml")
    code, _, err = run_here(capsys, "train", config, "--dry-run", "--world-size", "32")
    assert_usage_error(code, err, "train.batch_size=16", "can be 128 or 256")
    for size in ("128", "256"):
        code, out, err = run_here(capsys, "train", config, f"--train.batch_size={size}", f"--run.dir={tmp_path / 'run'}",
                                  "--dry-run", "--world-size", "32")
        assert code == 0, err
        assert "dp_shard=32" in out and f"{size} x 2048" in out and "nothing was trained" in out
    assert not (tmp_path / "run").exists()


def test_dry_run_takes_torchruns_world_size_and_checks_data_and_faults(capsys, tmp_path, monkeypatch, byte_data):
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, out, err = run_here(capsys, "train", *TINY, f"--data.path={byte_data}", f"--run.dir={tmp_path / 'run'}",
                              "--dry-run")
    assert code == 0 and "dp_shard=4" in out and "vocabulary 256" in out, err
    assert_usage_error(*run_here(capsys, "train", *TINY, f"--data.path={tmp_path / 'none'}", "--dry-run")[::2],
                       str(tmp_path / "none"))
    monkeypatch.setenv("GIGATRAIN_FAULT", "kill:step=3:rank=4")
    assert_usage_error(*run_here(capsys, "train", *TINY, "--dry-run")[::2], "rank=4", "ranks 0 to 3")
    assert not (tmp_path / "run").exists()


def test_world_size_without_dry_run_is_refused(capsys):
    assert_usage_error(*run_here(capsys, "train", "--world-size", "8")[::2], "--dry-run")
