"""`gigatrain report`'s summary and plots, from a run directory's files read through RunDir."""

import json

import pytest

from gigatrain.config import ConfigError
from gigatrain.metrics.report import report, summarize
from gigatrain.rundir import RunDir


def write_run(run: RunDir, steps: int = 10, moe: bool = False) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    records = [{"step": i, "loss": 5.0 - 0.1 * i, "tokens_per_s": 1000.0, "mfu": 0.5, "step_time_s": 1.0,
                "time": 100.0 + i} for i in range(1, steps + 1)]
    if moe:  # two MoE layers, as an MoE run's steps record them
        for record in records:
            record.update({"expert_load": [1.5, 2.0 + record["step"] / 10], "aux_loss": 1.1})
            record["expert_load_max"] = sum(record["expert_load"]) / 2
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


def test_an_moe_runs_report_draws_the_expert_load_and_a_dense_runs_does_not(tmp_path, capsys):
    dense, moe = RunDir(tmp_path / "dense"), RunDir(tmp_path / "moe")
    write_run(dense)
    write_run(moe, moe=True)
    report(dense)
    assert not dense.expert_load_plot.exists() and "expert_load" not in capsys.readouterr().out
    summary = report(moe)
    assert moe.expert_load_plot.stat().st_size > 0
    assert str(moe.expert_load_plot) in capsys.readouterr().out.replace("\n", "")
    assert (summary["expert_load_max"], summary["aux_loss"]) == (2.25, 1.1)


def test_a_folder_without_steps_or_that_does_not_exist_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        report(RunDir(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="has no training steps in metrics.jsonl"):
        report(RunDir(tmp_path))


def test_the_report_shows_each_restart_phase_as_its_median_and_where_state_was_loaded_from(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    write_run(run)
    phases = {"detect_s": 1.0, "start_s": 0.0, "imports_s": 4.0, "rendezvous_s": 0.5, "build_s": 1.0, "load_s": 0.5,
              "compile_s": 0.0, "first_step_s": 0.25}
    events = [{"event": "start", "step": 0, "process_start": 90.0, "time": 95.0},
              {"event": "startup", "step": 0, "loaded_from": None, "startup_s": 6.0, "time": 101.0,
               "phases": {name: value for name, value in phases.items() if name not in ("detect_s", "start_s")}}]
    for i, (detect, load) in enumerate([(1.0, 0.5), (3.0, 2.5), (2.0, 0.75)]):  # three restarts
        restart = {**phases, "detect_s": detect, "load_s": load}
        events.append({"event": "restart", "step": 5, "after": "failure", "recomputed_steps": 1, "recomputed_s": 1.0,
                       "restart_s": sum(restart.values()), "phases": restart,
                       "loaded_from": "memory" if i == 1 else "storage", "time": 102.0 + i})
    run.events.write_text("".join(json.dumps(e) + "\n" for e in events))
    summary = report(run)
    out = capsys.readouterr().out
    phase_summary = summary["start_phases"]
    assert phase_summary["restarts"] == 3
    assert phase_summary["restart_phases"]["detect_s"] == 2.0 and phase_summary["restart_phases"]["load_s"] == 0.75
    assert phase_summary["restart_s"] == 8.5  # the median restart (detect 2.0, load 0.75)
    assert phase_summary["loaded_from"] == {"storage": 2, "memory": 1}
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:4]]
            for line in out.splitlines() if line.count("│") == 4}
    assert rows["detect"] == ["2.00", "-"] and rows["load"] == ["0.75", "0.50"] and rows["imports"] == ["4.00", "4.00"]
    assert rows["total"] == ["8.50", "6.00"]
    assert "median of 3" in out and "storage (2), memory (1)" in out


def test_a_run_without_recorded_phases_has_no_phase_table(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    write_run(run)
    run.events.write_text(json.dumps({"event": "restart", "step": 5, "restart_s": 3.0, "time": 1.0}) + "\n")
    assert "start_phases" not in report(run)
    assert "where start-up time goes" not in capsys.readouterr().out
