"""Checkpoint integrity in one process: manifests and checksums, damaged, tampered and partial
checkpoints, fallback to the previous one, failed writes, and async saves equal to sync ones."""

import dataclasses
import json
import pickle
import shutil

import pytest
import torch

from helpers import TINY, model_and_optimizer, rehash, run_cli
from gigatrain.checkpoint import dcp as checkpoint
from gigatrain.fault.inject import FaultPlan, parse
from gigatrain.models.presets import get_preset
from gigatrain.models.transformer import Transformer
from gigatrain.paths import sha256_file
from gigatrain.rundir import RunDir, resolve_run_config
from gigatrain.train.trainer import train


def save(directory, step, model, optimizer, async_save=False, faults=None, keep=3):
    events = []
    saver = checkpoint.Checkpointer(directory, keep=keep, async_save=async_save, faults=faults, on_event=events.append)
    saver.save(step, [model], [optimizer], {"step": step})
    committed = saver.wait()
    saver.close()
    return committed, events


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def two_checkpoints(tmp_path):
    directory = tmp_path / "checkpoints"
    model, optimizer = model_and_optimizer(seed=1)
    save(directory, 1, model, optimizer)
    first = weights(model)
    model, optimizer = model_and_optimizer(seed=2)
    save(directory, 2, model, optimizer)
    return directory, first, weights(model)


def test_manifest_lists_every_file_with_its_sha256(two_checkpoints):
    directory, _, _ = two_checkpoints
    folder = directory / "step_00000002"
    manifest = json.loads((folder / checkpoint.MANIFEST_FILE).read_text())
    on_disk = {p.name for p in folder.iterdir()} - {checkpoint.MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk and ".metadata" in on_disk and "trainer_state.json" in on_disk
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(folder / name)
        assert entry["bytes"] == (folder / name).stat().st_size
    assert checkpoint.verify(folder) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest", "no_manifest"])
def test_damaged_latest_is_reported_and_the_previous_one_loads(two_checkpoints, damage):
    directory, first, _ = two_checkpoints
    folder = directory / "step_00000002"
    shard = sorted(folder.glob("*.distcp"))[0]
    if damage == "flip":
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        shard.write_bytes(bytes(raw))
        expected = f"{shard.name} does not match its sha256 in manifest.json"
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
        expected = f"{shard.name} has 100 bytes, the manifest says"
    elif damage == "delete":
        shard.unlink()
        expected = f"{shard.name} is missing"
    elif damage == "manifest":
        (folder / checkpoint.MANIFEST_FILE).write_text("{not json")
        expected = "manifest.json is unreadable"
    else:  # nothing to verify the files against: never loaded
        (folder / checkpoint.MANIFEST_FILE).unlink()
        expected = "manifest.json is missing"
    reports = []
    model, _ = model_and_optimizer(seed=3)
    path, state = checkpoint.restore(directory, [model], report=reports.append)
    assert path.name == "step_00000001" and state["step"] == 1
    report, = reports
    assert report.startswith(f"checkpoint {folder} is damaged: {expected}")
    assert report.endswith("; falling back to step_00000001")
    for name, value in model.state_dict().items():
        assert torch.equal(value, first[name]), name
    # Kept for inspection, out of the way of the next resume; `latest` names the good one.
    assert (directory / "corrupt-step_00000002").is_dir() and not folder.exists()
    assert (directory / checkpoint.LATEST_FILE).read_text().strip() == "step_00000001"


def test_readers_fall_back_without_changing_anything(two_checkpoints):
    directory, first, _ = two_checkpoints
    (directory / "step_00000002" / "trainer_state.json").write_text('{"step": 99}')
    before = sorted(p.name for p in directory.iterdir())
    model, _ = model_and_optimizer(seed=3)
    path, _ = checkpoint.restore(directory, [model], report=lambda message: None, repair=False)
    assert path.name == "step_00000001"
    assert sorted(p.name for p in directory.iterdir()) == before


def test_when_every_checkpoint_is_damaged_nothing_is_renamed_and_the_error_says_so(two_checkpoints):
    directory, _, _ = two_checkpoints
    for folder in checkpoint.committed(directory):
        (folder / ".metadata").write_bytes(b"garbage")
    model, _ = model_and_optimizer(seed=3)
    with pytest.raises(checkpoint.CheckpointError, match=r"no loadable checkpoint in .*all 2 are damaged"):
        checkpoint.restore(directory, [model], report=lambda message: None)
    assert [p.name for p in checkpoint.committed(directory)] == ["step_00000001", "step_00000002"]


def test_partial_checkpoint_is_never_loaded_and_is_removed(two_checkpoints):
    directory, _, second = two_checkpoints
    partial = directory / ".tmp-step_00000003"
    shutil.copytree(directory / "step_00000002", partial)  # a writer that died before the rename
    reports = []
    model, _ = model_and_optimizer(seed=3)
    path, _ = checkpoint.restore(directory, [model], report=reports.append)
    assert path.name == "step_00000002" and not partial.exists()
    assert "removing .tmp-step_00000003" in reports[0]


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_write_leaves_the_previous_checkpoint(two_checkpoints, tmp_path, async_save):
    directory, _, second = two_checkpoints
    model, optimizer = model_and_optimizer(seed=4)
    committed, events = save(directory, 3, model, optimizer, async_save=async_save,
                             faults=FaultPlan(parse("ckpt_fail:step=3"), tmp_path, rank=0))
    assert not committed
    failed, = events
    assert (failed["event"], failed["step"]) == ("checkpoint_failed", 3) and failed["stall_s"] >= 0
    # Not torch's "unexpected pos 704 vs 598": the ENOSPC behind it, and where.
    assert failed["error"] == f"rank 0: no space left on {checkpoint.device_of(directory)} ({directory / '.tmp-step_00000003'})"
    assert [p.name for p in checkpoint.committed(directory)] == ["step_00000001", "step_00000002"]
    assert not list(directory.glob(".tmp-*"))
    loaded, _ = model_and_optimizer(seed=3)
    assert checkpoint.restore(directory, [loaded])[0].name == "step_00000002"
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, second[name]), name


def test_async_save_captures_the_state_at_the_call_and_equals_a_sync_save(tmp_path):
    model, optimizer = model_and_optimizer(seed=5)
    at_save = weights(model)
    saver = checkpoint.Checkpointer(tmp_path / "async", keep=2, async_save=True)
    stall = saver.save(7, [model], [optimizer], {"step": 7})
    with torch.no_grad():  # training goes on while the files are written
        for param in model.parameters():
            param.add_(1.0)
    assert saver.wait()
    saver.close()
    save(tmp_path / "sync", 7, *model_and_optimizer(seed=5))
    assert stall >= 0
    for kind in ("async", "sync"):
        loaded, loaded_optimizer = model_and_optimizer(seed=6)
        _, state = checkpoint.restore(tmp_path / kind / "", [loaded], [loaded_optimizer])
        assert state["step"] == 7
        for name, value in loaded.state_dict().items():
            assert torch.equal(value, at_save[name]), (kind, name)


class WritesMarker:
    """A pickle that creates a file when unpickled: what a malicious .metadata would do."""

    # How pickle names the callable: io.open up to Python 3.11, _io.open from 3.12.
    GLOBAL = f"{open.__module__}.{open.__qualname__}"

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_metadata_that_would_run_code_is_refused(two_checkpoints, tmp_path):
    directory, first, _ = two_checkpoints
    folder, marker = directory / "step_00000002", tmp_path / "marker"
    payload = pickle.dumps(WritesMarker(marker))
    pickle.loads(payload)  # the payload works: plain unpickling creates the marker
    assert marker.exists()
    marker.unlink()
    (folder / ".metadata").write_bytes(payload)
    rehash(folder)
    reports = []
    model, _ = model_and_optimizer(seed=3)
    path, _ = checkpoint.restore(directory, [model], report=reports.append)
    assert not marker.exists()
    assert path.name == "step_00000001"
    report, = reports
    assert report.startswith(f"checkpoint {folder} was refused: .metadata references {WritesMarker.GLOBAL}, "
                             f"which DCP metadata never holds")
    for name, value in model.state_dict().items():
        assert torch.equal(value, first[name]), name


@pytest.mark.parametrize("tamper", ["bytes_item", "outside_file"])
def test_metadata_of_more_than_tensors_in_the_folder_is_refused(two_checkpoints, tamper):
    """Byte items are loaded with torch.load(weights_only=False); files may be named anywhere."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    directory, _, _ = two_checkpoints
    folder = directory / "step_00000002"
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # our own file, just written
    if tamper == "bytes_item":
        metadata.state_dict_metadata["model.norm.weight"] = BytesStorageMetadata()
        expected = ".metadata references torch.distributed.checkpoint.metadata.BytesStorageMetadata"
    else:
        index = next(iter(metadata.storage_data))
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index],
                                                           relative_path="../step_00000001/__0_0.distcp")
        expected = f".metadata stores {index.fqn!r} in '../step_00000001/__0_0.distcp', not in a plain .distcp file"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    rehash(folder)
    reports = []
    model, _ = model_and_optimizer(seed=3)
    assert checkpoint.restore(directory, [model], report=reports.append)[0].name == "step_00000001"
    assert expected in reports[0] and "was refused" in reports[0]


def test_another_model_is_a_mismatch_naming_the_tensors_not_damage(two_checkpoints):
    directory, _, _ = two_checkpoints
    narrower = Transformer(dataclasses.replace(get_preset("tiny"), d_model=32))
    reports = []
    with pytest.raises(checkpoint.CheckpointMismatch) as caught:
        checkpoint.restore(directory, [narrower], report=reports.append)
    message = str(caught.value)
    assert "model.tok_embeddings.weight is [256, 64] there and [256, 32] here" in message
    assert "--run.dir=<new dir>" in message and "damaged" not in message and "backup" not in message
    assert reports == [] and [p.name for p in checkpoint.committed(directory)] == ["step_00000001", "step_00000002"]


def test_a_full_disk_at_the_final_checkpoint_exits_5_naming_the_device(tmp_path, byte_data):
    run_dir = tmp_path / "run"
    result = run_cli("train", *TINY, f"--run.dir={run_dir}", f"--data.path={byte_data}", "--train.max_steps=2",
                     env={"GIGATRAIN_FAULT": "ckpt_fail:step=2"})
    assert result.returncode == 5
    where = f"no space left on {checkpoint.device_of(run_dir)} ({RunDir(run_dir).checkpoints / '.tmp-step_00000002'})"
    error, = [line for line in result.stderr.splitlines() if line.startswith("gigatrain: error:")]
    assert error == (f"gigatrain: error: the checkpoint at step 2 could not be written (rank 0: {where}); "
                     f"the run can resume from the previous one once the storage is fixed")
    assert "unexpected pos" not in result.stderr and "Traceback" not in result.stderr
    assert not list(RunDir(run_dir).checkpoints.iterdir())  # nothing half-written left behind


def test_gigatrain_eval_refuses_a_checkpoint_that_would_run_code(tmp_path, byte_data, heldout):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    train(resolve_run_config(None, [*TINY, f"--run.dir={run_dir}", f"--data.path={byte_data}", "--train.max_steps=1"]))
    folder = checkpoint.latest(RunDir(run_dir).checkpoints)
    (folder / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))
    rehash(folder)
    result = run_cli("eval", str(run_dir), "--text", str(heldout))
    assert result.returncode == 2 and result.stdout == ""
    assert not marker.exists()
    assert f"checkpoint {folder} was refused: .metadata references {WritesMarker.GLOBAL}" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"gigatrain: error: no loadable checkpoint in {RunDir(run_dir).checkpoints}")
