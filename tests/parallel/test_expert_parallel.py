"""Expert parallelism without processes: the regrouping of received tokens, the layout that
carries ep, and the errors of an impossible EP layout (one line, exit 2, before start-up).
Multi-process equivalence and resharding: test_moe_layouts.py."""

import pytest
import torch

from gigatrain.cli import run as cli_run
from gigatrain.config import ConfigError, load_config, resolve_model_args
from gigatrain.parallel.expert import regroup_index
from gigatrain.parallel.mesh import parallel_dims

MOE = ["--model.preset=tiny-moe", "--data.seq_len=32", "--train.batch_size=8"]


@pytest.mark.parametrize("seed", range(20))
def test_regroup_index_orders_received_tokens_by_expert_then_peer(seed):
    g = torch.Generator().manual_seed(seed)
    peers, local = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    counts = torch.randint(0, 4, (peers, local), generator=g)  # zeros included: experts without tokens
    # Tokens arrive peer by peer, each peer's sorted by expert; label each by (expert, peer, i).
    arrived = [(e, p, i) for p in range(peers) for e in range(local) for i in range(int(counts[p, e]))]
    index = regroup_index(counts)
    assert [arrived[j] for j in index.tolist()] == sorted(arrived)


def test_parallel_dims_carry_ep_and_run_json_layout_names_it():
    cfg = load_config(None, [*MOE, "--parallel.ep=2"])
    d = parallel_dims(cfg, resolve_model_args(cfg), n_processes=8)
    assert (d.dp_shard, d.ep, d.efsdp, d.world_size) == (8, 2, 4, 8)  # ep adds no processes
    assert d.to_dict()["ep"] == 2
    cfg = load_config(None, [*MOE, "--parallel.ep=4", "--parallel.cp=2"])
    assert parallel_dims(cfg, resolve_model_args(cfg), n_processes=8).efsdp == 2  # dp_shard 4 x cp 2 = efsdp 2 x ep 4


@pytest.mark.parametrize("overrides, world, words", [
    (["--model.preset=tiny", "--parallel.ep=2"], 2, ["parallel.ep=2", "dense", "parallel.ep=1"]),
    ([*MOE, "--parallel.ep=3"], 3, ["parallel.ep=3", "model.n_experts=8", "divides 8"]),
    ([*MOE, "--parallel.ep=0"], 1, ["parallel.ep=0", "not valid"]),
    ([*MOE, "--parallel.ep=4", "--parallel.tp=2"], 4, ["parallel.ep=4", "dp_shard*parallel.cp=2*1=2", "divides 2"]),
    ([*MOE, "--parallel.ep=8", "--parallel.dp_replicate=2"], 8, ["parallel.ep=8", "dp_shard*parallel.cp=4*1=4"]),
])
def test_impossible_ep_layout_is_one_line_before_start_up(capsys, tmp_path, overrides, world, words):
    code = cli_run(["train", *overrides, f"--run.dir={tmp_path / 'run'}", "--dry-run", "--world-size", str(world)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError):
        cfg = load_config(None, overrides)
        parallel_dims(cfg, resolve_model_args(cfg), n_processes=world)


def test_ep_error_through_the_command_line(tmp_path, capsys):
    code = cli_run(["train", *MOE, "--parallel.ep=3", f"--run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip()
    assert err.strip().splitlines() == [line for line in err.strip().splitlines() if "parallel.ep=3" in line]


def test_dry_run_shows_ep(capsys, tmp_path):
    code = cli_run(["train", *MOE, "--parallel.ep=2", f"--run.dir={tmp_path / 'run'}", "--dry-run", "--world-size", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "dp_shard=4" in out and "ep=2" in out, out
