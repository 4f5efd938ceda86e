"""GIGATRAIN_FAULT: parsing, the fired record that keeps a restarted process from firing a
fault again, and bad values rejected with one line and exit code 2."""

import json

import pytest
import torch

from gigatrain.cli import run as cli_run
from gigatrain.config import ConfigError
from gigatrain.fault.inject import FaultPlan, parse
from gigatrain.rundir import RunDir
from helpers import TINY


def test_parse_the_documented_examples():
    faults = parse("kill:step=7:rank=1; hang:step=4:rank=0;nan:step=5;slow:rank=1:seconds=2;ckpt_fail:step=6")
    assert [(f.kind, f.step, f.rank) for f in faults] == [("kill", 7, 1), ("hang", 4, 0), ("nan", 5, 0),
                                                         ("slow", None, 1), ("ckpt_fail", 6, 0)]
    assert faults[3].seconds == 2.0 and faults[2].count == 1 and faults[0].at == "step"
    assert parse("kill:step=3:at=save")[0].at == "save"
    assert parse("") == [] and parse(" ; ") == []


@pytest.mark.parametrize("text, message", [
    ("explode:step=1", "unknown fault kind 'explode'"),
    ("kill:rank=1", "'kill:rank=1' needs step="),
    ("kill:step=x", "step='x' in 'kill:step=x' is not an integer"),
    ("kill:step=3:when=now", "'when=now' in 'kill:step=3:when=now' is not valid; kill takes step=, rank=, at="),
    ("kill:step=3:at=lunch", "at='lunch'"),
    ("nan:step=0", "step=0 in 'nan:step=0' is not valid"),
    ("slow:seconds=-1", "rank and seconds cannot be negative"),
])
def test_bad_values_are_named(text, message):
    with pytest.raises(ConfigError, match="GIGATRAIN_FAULT: .*" + message.replace("(", r"\(").replace("[", r"\[")):
        parse(text)


def test_a_fault_fires_once_per_run_directory(tmp_path):
    plan = FaultPlan(parse("nan:step=2:rank=1"), tmp_path, rank=1)
    grad = torch.ones(3)
    assert not plan.after_backward(1, [grad])
    assert plan.after_backward(2, [grad]) and torch.isnan(grad).all()
    marker, = RunDir(tmp_path).faults.iterdir()
    assert json.loads(marker.read_text())["step"] == 2
    # The process restarts from a checkpoint before step 2 and replays it: no second fault.
    again = FaultPlan(parse("nan:step=2:rank=1"), tmp_path, rank=1)
    assert not again.after_backward(2, [torch.ones(3)])
    # Another rank holds no fault; a different fault in the same run fires.
    assert not FaultPlan(parse("nan:step=2:rank=1"), tmp_path, rank=0)
    assert FaultPlan(parse("nan:step=2:rank=1:count=2"), tmp_path, rank=1).after_backward(2, [torch.ones(1)])


def test_nan_count_poisons_consecutive_steps(tmp_path):
    plan = FaultPlan(parse("nan:step=3:count=3"), tmp_path, rank=0)
    assert [plan.after_backward(step, [torch.ones(1)]) for step in range(1, 8)] == [False, False, True, True, True,
                                                                                  False, False]


def test_bad_fault_spec_and_rank_exit_2_with_one_line(tmp_path, byte_data, capsys, monkeypatch):
    for spec, message in [("kill:step=two", "step='two'"), ("kill:step=2:rank=3", "rank=3 in 'kill:step=2:rank=3' "
                                                                                   "is not valid; the job has 1 process")]:
        monkeypatch.setenv("GIGATRAIN_FAULT", spec)
        code = cli_run(["train", *TINY, f"--data.path={byte_data}", f"--run.dir={tmp_path / 'run'}"])
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith("gigatrain: error: GIGATRAIN_FAULT: ") and message in err
        assert len(err.strip().splitlines()) == 1
