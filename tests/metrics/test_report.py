"""`gigatrain report`'s summary and plots, from a run directory's files read through RunDir."""

import json

import pytest

from gigatrain.config import ConfigError
from gigatrain.metrics.report import report, summarize
from gigatrain.rundir import RunDir


def write_run(run: RunDir, steps: int = 10) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    records = [{"step": i, "loss": 5.0 - 0.1 * i, "tokens_per_s": 1000.0, "mfu": 0.5, "step_time_s": 1.0,
                "time": 100.0 + i} for i in range(1, steps + 1)]
    records.insert(5, {"step": 5, "val_loss": 4.6, "val_bpb": 1.5})
    lines = "".join(json.dumps(r) + "\n" for r in records)
    run.metrics.write_text(lines + '{"step": 11, "loss": 4')  # the last line torn by a crash mid-write
    run.write_run_info({"device_name": "cpu", "n_params": 1234, "git_sha": "abc"})


def test_summary_skips_a_torn_line_and_reads_run_info(tmp_path):
    run = RunDir(tmp_path / "run")
    write_run(run)
    summary = summarize(run)
    assert (summary["steps"], summary["final_loss"]) == (10, pytest.approx(4.0))
    assert (summary["val_loss"], summary["best_val_step"]) == (4.6, 5)
    assert (summary["device"], summary["n_params"]) == ("cpu", 1234)
    assert "goodput" not in summary  # no events.jsonl


def test_report_draws_the_plots_into_the_run_directory(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    write_run(run)
    report(run)
    assert run.loss_plot.stat().st_size > 0 and run.throughput_plot.stat().st_size > 0
    assert "final_loss" in capsys.readouterr().out


def test_a_folder_without_steps_or_that_does_not_exist_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        report(RunDir(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="has no training steps in metrics.jsonl"):
        report(RunDir(tmp_path))
