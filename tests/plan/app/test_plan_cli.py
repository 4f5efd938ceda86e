"""`gigatrain plan`: the JSON interface, bad input, sweeps, and the listing commands."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gigatrain.plan.app.cli import main

REQUIRED_KEYS = {"mfu", "tokens_per_s", "step_time_s", "days", "power_mw", "energy_mwh", "cost_lease_usd",
                 "cost_build_usd", "dp_replicate", "dp_shard", "tp", "pp", "cp"}


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_interface(capsys):
    plan = run_json(capsys, "--model", "llama3-70b", "--tokens", "15T", "--gpus", "1024", "--gpu", "h100")
    best = plan["best"]
    assert REQUIRED_KEYS <= set(best)
    assert plan["layouts"][0] == best
    assert 0 < best["mfu"] < 1
    degrees = [best[k] for k in ("dp_replicate", "dp_shard", "tp", "pp", "cp")]
    assert best["gpus_used"] == degrees[0] * degrees[1] * degrees[2] * degrees[3] * degrees[4] <= 1024
    # Days follow from the token budget and the throughput.
    assert best["days"] == pytest.approx(15e12 / best["tokens_per_s"] / 86400)
    assert best["power_mw"] > 1 and best["energy_mwh"] > 0 and best["cost_lease_usd"] > best["cost_build_usd"] > 0
    steps = [row["step_time_s"] for row in plan["layouts"]]
    assert steps == sorted(steps) or steps[0] <= min(steps) * 1.002


def test_json_parameter_counts_and_ep(capsys):
    """Every layout carries ep beside the degrees; the plan carries total and active parameters."""
    from gigatrain.models.flops import param_counts
    from gigatrain.models.presets import get_preset

    dense = run_json(capsys, "--model", "llama3-8b", "--gpus", "64")
    assert dense["params_total"] == dense["params_active"] == dense["params"] == param_counts(get_preset("llama3-8b")).total
    assert all(row["ep"] == 1 for row in dense["layouts"])
    moe = run_json(capsys, "--model", "tiny-moe", "--gpus", "8", "--tokens", "1B", "--top", "8")
    counts = param_counts(get_preset("tiny-moe"))
    assert (moe["params_total"], moe["params_active"]) == (counts.total, counts.active)
    assert moe["params_active"] < moe["params_total"]
    for row in moe["layouts"]:
        assert 8 % row["ep"] == 0 and (row["dp_shard"] * row["cp"]) % row["ep"] == 0
        assert (f"ep{row['ep']}" in row["layout"]) == (row["ep"] > 1) and "ep_comm" in row["time_s"]
    assert any(row["ep"] > 1 for row in moe["layouts"])
    fixed = run_json(capsys, "--model", "tiny-moe", "--gpus", "8", "--ep", "4")
    assert {row["ep"] for row in fixed["layouts"]} == {4}


def test_tokens_and_gpus_take_suffixes(capsys):
    plan = run_json(capsys, "--model", "llama3-8b", "--tokens", "300B", "--gpus", "1Ki", "--batch", "4M")
    assert plan["tokens"] == 300e9 and plan["gpus"] == 1024 and plan["global_batch"] == round(4e6 / 8192)


@pytest.mark.parametrize("argv, words", [
    (["--model", "llama3-9b"], "unknown model"),
    (["--model", "llama3-8b", "--gpu", "tpu-v9"], "unknown gpu"),
    (["--model", "llama3-8b", "--tokens", "15X"], "cannot read tokens"),
    (["--model", "llama3-8b", "--sweep", "gpus"], "cannot read sweep"),
    (["--model", "llama3-8b", "--sweep", "gpus=8,lots"], "cannot read gpus"),
    (["--model", "llama3-405b", "--gpus", "8"], "no layout fits"),
    (["--model", "llama3-8b", "--pue", "-1"], "positive"),
    (["--model", "llama3-8b", "--ep", "2"], "needs a mixture-of-experts model"),
    (["--model", "tiny-moe", "--ep", "3"], "must divide the 8 experts"),
    (["--calibrate", "/nonexistent-run"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, words):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gigatrain: error: ") and words in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_bad_input_through_the_command_line():
    result = subprocess.run([sys.executable, "-m", "gigatrain", "plan", "--model", "llama3-8b", "--gpu", "nope"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("gigatrain: error: unknown gpu") and len(result.stderr.strip().splitlines()) == 1


def test_sweep_table_json_and_png(capsys, tmp_path: Path):
    png = tmp_path / "sweep.png"
    sweep = run_json(capsys, "--model", "llama3-8b", "--tokens", "1T", "--sweep", "gpus=64,256,1Ki", "--plot", str(png))
    assert sweep["key"] == "gpus" and [row["value"] for row in sweep["rows"]] == [64, 256, 1024]
    days = [row["best"]["days"] for row in sweep["rows"]]
    assert days[0] > days[1] > days[2]
    assert png.stat().st_size > 10_000 and sweep["plot"] == str(png)


def test_sweep_over_gpu_kinds(capsys, tmp_path: Path):
    sweep = run_json(capsys, "--model", "llama3-8b", "--gpus", "64", "--sweep", "gpu=a100,h100,b200",
                     "--plot", str(tmp_path / "kinds.png"))
    days = {row["value"]: row["best"]["days"] for row in sweep["rows"]}
    assert days["a100"] > days["h100"] > days["b200"]


def test_simulation_in_the_plan(capsys):
    plan = run_json(capsys, "--model", "llama3-8b", "--gpus", "1024", "--tokens", "15T", "--simulate", "300")
    assert set(plan["simulation"]) == set(plan["recovery"])
    for sim in plan["simulation"].values():
        assert sim["p10_days"] <= sim["p50_days"] <= sim["p90_days"]
        assert sim["mean_days"] == pytest.approx(sim["closed_form_days"], rel=0.02)


def test_recovery_modes_in_the_plan(capsys):
    """The interface of issue 15: `recovery` holds each mode's goodput, days and restart; the
    best layout carries the best mode's; the restart is built from its phases."""
    plan = run_json(capsys, "--model", "llama3-405b", "--tokens", "15T", "--gpus", "100000", "--gpu", "h100")
    recovery, best = plan["recovery"], plan["best"]
    assert list(recovery) == ["storage", "memory", "replica"]
    for rel in recovery.values():
        assert {"goodput", "days_expected", "restart_s", "phases"} <= set(rel)
        assert rel["restart_s"] == pytest.approx(sum(rel["phases"].values()))
    mode = max(recovery, key=lambda name: recovery[name]["goodput"])
    assert plan["recovery_mode"] == best["recovery_mode"] == mode == "replica"
    assert (best["goodput"], best["days_expected"]) == (recovery[mode]["goodput"], recovery[mode]["days_expected"])
    assert best["goodput"] >= 0.95  # the target, with the documented inputs (--sources)
    assert recovery["replica"]["replica_groups"] >= 2
    # Fixing the layout's replica groups to 4 keeps the mode honest about fewer, larger groups.
    four = run_json(capsys, "--model", "llama3-405b", "--tokens", "15T", "--gpus", "100000", "--gpu", "h100",
                    "--dp-replicate", "4", "--set", "detect_s=30")
    assert four["recovery"]["replica"]["replica_groups"] == 4
    assert four["recovery"]["replica"]["goodput"] < recovery["replica"]["goodput"]
    assert four["inputs"]["reliability"]["detect_s"] == 30
    assert main(["--model", "llama3-8b", "--gpus", "8", "--set", "detect=3"]) == 2
    assert "--set 'detect=3': write KEY=VALUE with KEY one of" in capsys.readouterr().err


def test_catalog_extension(capsys, tmp_path: Path):
    extra = tmp_path / "mine.toml"
    extra.write_text('[h100]\nlease_usd_per_gpu_hour = 1.0\n[h100.sources]\nlease_usd_per_gpu_hour = "our contract"\n'
                     '[h100x]\ndescription = "a faster H100"\npeak_bf16_tflops = 1979.0\npeak_fp8_tflops = 0.0\n'
                     'memory_gb = 80.0\nmemory_bw_gbs = 3350.0\nscaleup_bw_gbs = 450.0\nscaleup_domain = 8\n'
                     'scaleout_bw_gbs = 50.0\nscaleout_latency_us = 5.0\ntdp_w = 700.0\ngpus_per_node = 8\n'
                     'node_power_w = 10200.0\nmatmul_efficiency = 0.71\nattention_efficiency = 0.45\n'
                     'lease_usd_per_gpu_hour = 3.0\ncapex_usd_per_gpu = 40000.0\n')
    gpus = run_json(capsys, "--list-gpus", "--catalog", str(extra))
    assert gpus["h100"]["lease_usd_per_gpu_hour"] == 1.0 and gpus["h100"]["memory_gb"] == 80.0
    assert gpus["h100x"]["peak_bf16_tflops"] == 1979.0
    plan = run_json(capsys, "--model", "llama3-8b", "--gpus", "8", "--gpu", "h100x", "--catalog", str(extra))
    assert plan["gpu"] == "h100x"


def test_listing_commands(capsys):
    assert {row["run"] for row in run_json(capsys, "--published")["published"]}
    sources = run_json(capsys, "--sources")
    assert all(entry["source"] for section in sources.values() for entry in section.values())
    assert main(["--model", "llama3-8b", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "Layouts ranked by step time" in out and "Power and cost" in out and "Recovery modes" in out
    assert "Restart phases" in out


def test_model_from_a_toml_config(capsys, tmp_path: Path):
    config = tmp_path / "run.toml"
    config.write_text('[model]\npreset = "llama3-8b"\nn_layers = 16\n[data]\nseq_len = 4096\n[train]\nbatch_size = 256\n')
    plan = run_json(capsys, "--model", str(config), "--gpus", "64")
    assert (plan["model"], plan["seq_len"], plan["global_batch"]) == ("run", 4096, 256)
    assert plan["params"] < 8e9  # the config's 16 layers, not the preset's 32


def test_efficiency_file_must_match_the_gpu(capsys, tmp_path: Path):
    path = tmp_path / "cpu.toml"
    path.write_text('device = "cpu"\npeak_tflops = 0.06\n[efficiency]\nmatmul = 0.9\n')
    assert main(["--model", "tiny", "--gpu", "h100", "--efficiency", str(path)]) == 2
    assert "fitted on cpu runs" in capsys.readouterr().err
    assert main(["--model", "tiny", "--gpu", "cpu", "--gpus", "1", "--efficiency", str(path), "--json"]) == 0
