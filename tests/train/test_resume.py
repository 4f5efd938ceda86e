"""Resuming checks identity: the model shape, tokenizer and data a run's checkpoints were
trained with, before any tensor is loaded."""

import json

import pytest

from helpers import TINY, rehash, run_cli, write_corpus
from gigatrain.checkpoint import dcp as checkpoint
from gigatrain.data.prepare import prepare
from gigatrain.rundir import resolve_run_config
from gigatrain.train.trainer import train


def start(run_dir, data):
    """A two-step run with its final checkpoint."""
    train(resolve_run_config(None, [*TINY, f"--run.dir={run_dir}", f"--data.path={data}", "--train.max_steps=2"]))
    return (run_dir / "config.json").read_text()


def resume(run_dir, *overrides):
    return train(resolve_run_config(None, [f"--run.dir={run_dir}", "--train.max_steps=3", *overrides]))


@pytest.fixture(scope="module")
def other_byte_data(tmp_path_factory, heldout):
    """Other documents, the same tokenizer."""
    corpus = write_corpus(tmp_path_factory.mktemp("other") / "train", offset=24)
    out = tmp_path_factory.mktemp("data") / "other-byte"
    prepare([str(corpus)], out, val_sources=[str(heldout)], tokenizer="byte")
    return out


def test_another_head_count_with_the_same_tensor_sizes_is_refused_in_one_line(tmp_path, byte_data):
    run_dir = tmp_path / "run"
    config = start(run_dir, byte_data)  # tiny: 4 heads, 2 of them key/value heads
    result = run_cli("train", f"--run.dir={run_dir}", "--model.n_heads=2", "--model.n_kv_heads=1", "--train.max_steps=3")
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"gigatrain: error: cannot resume {run_dir} from step_00000002: the model differs "
                           f"(model.n_heads 4 -> 2, model.n_kv_heads 2 -> 1)")
    assert "resume with --model.n_heads=4 --model.n_kv_heads=2, or" in line and "--run.dir=<new dir>" in line
    assert (run_dir / "config.json").read_text() == config
    assert checkpoint.latest(run_dir / "checkpoints").name == "step_00000002"


def test_other_data_needs_an_explicit_switch_that_is_not_saved(tmp_path, byte_data, other_byte_data):
    run_dir = tmp_path / "run"
    config = start(run_dir, byte_data)
    with pytest.raises(checkpoint.CheckpointMismatch, match=rf"the data differs \({byte_data} -> {other_byte_data}, "
                                                           rf"other shards\): .*--data.allow_change=true"):
        resume(run_dir, f"--data.path={other_byte_data}")
    assert (run_dir / "config.json").read_text() == config

    assert resume(run_dir, f"--data.path={other_byte_data}", "--data.allow_change=true").step == 3
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["data"]["path"] == str(other_byte_data) and saved["data"]["allow_change"] is False
    state = json.loads((run_dir / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["identity"]["data"]["path"] == str(other_byte_data)
    assert resume(run_dir, "--train.max_steps=4").step == 4  # the new data is the run's now


def test_the_tokenizer_never_changes(tmp_path, byte_data, bpe_data):
    run_dir = tmp_path / "run"
    start(run_dir, byte_data)
    with pytest.raises(checkpoint.CheckpointMismatch) as caught:
        resume(run_dir, f"--data.path={bpe_data}", "--data.allow_change=true")
    message = str(caught.value)
    assert "the tokenizer differs (byte, 256 tokens" in message and "-> bpe, 512 tokens" in message
    assert "a run cannot change its tokenizer; start a new run with --run.dir=<new dir>" in message
    assert "the data differs" not in message  # allowed; the tokenizer is not


def test_a_malformed_identity_is_damage_not_a_crash(tmp_path, byte_data):
    run_dir = tmp_path / "run"
    start(run_dir, byte_data)
    folder = checkpoint.latest(run_dir / "checkpoints")
    state = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps({**state, "identity": {"model": 1}}))
    rehash(folder)
    with pytest.raises(checkpoint.CheckpointError, match="no loadable checkpoint .* damaged or refused"):
        resume(run_dir)
