"""A whole MoE run in one process: exact resume (router bias included), and `gigatrain eval`
and `generate` on its checkpoint."""

import json

import torch

from helpers import TINY, final_weights
from gigatrain.cli import run as cli
from gigatrain.rundir import RunDir, resolve_run_config
from gigatrain.train.trainer import train

MOE = ["--model.preset=tiny-moe", "--train.device=cpu", "--model.aux_loss_coef=0.01", "--model.bias_update_rate=0.01"]


def config(run_dir, data, *extra):
    return resolve_run_config(None, [*TINY, *MOE, f"--run.dir={run_dir}", f"--data.path={data}", *extra])


def step_records(run_dir):
    keys = ("step", "loss", "grad_norm", "expert_load", "aux_loss")
    return [{k: r[k] for k in keys} for r in RunDir(run_dir).metrics_records() if "loss" in r]


def test_moe_run_resumes_exactly_and_its_checkpoint_evaluates_and_generates(tmp_path, byte_data, heldout, capsys):
    common = ["--train.max_steps=8", "--train.checkpoint_every=3", "--train.micro_batch_size=4"]
    train(config(tmp_path / "straight", byte_data, *common))
    assert train(config(tmp_path / "split", byte_data, *common, "--train.stop_at_step=4")).step == 4
    assert train(resolve_run_config(None, [f"--run.dir={tmp_path / 'split'}"])).step == 8

    straight = step_records(tmp_path / "straight")
    assert step_records(tmp_path / "split") == straight and [r["step"] for r in straight] == list(range(1, 9))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and "layers.1.feed_forward.router.expert_bias" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["layers.1.feed_forward.router.expert_bias"].abs().sum() > 0  # the bias moved and was restored

    capsys.readouterr()
    assert cli(["eval", str(tmp_path / "split"), "--text", str(heldout), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["step"] == 8 and 0 < result["bits_per_byte"] < 10
    assert cli(["generate", str(tmp_path / "split"), "--prompt", "def ", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")
