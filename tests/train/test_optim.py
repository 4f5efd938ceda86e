"""The optimizer in one process: Newton–Schulz, Muon equal to torch.optim.Muon, the param
groups and their rates, Muon training (dense and MoE) with exact resume."""

import pytest
import torch
from torch import nn

from helpers import TINY, final_weights
from gigatrain.config import TrainConfig
from gigatrain.parallel.muon import MuonWithAdamW, orthogonalize
from gigatrain.rundir import RunDir, resolve_run_config
from gigatrain.train.optim import build_optimizer, set_learning_rate
from gigatrain.train.trainer import train

MUON = ["--train.optimizer=muon"]


def test_newton_schulz_brings_singular_values_near_one_batched_as_per_slice():
    torch.manual_seed(0)
    for shape in [(48, 96), (96, 48), (4, 40, 24)]:  # wide, tall, a stack of experts
        update = torch.randn(shape)
        ortho = orthogonalize(update, torch.float32)
        singular = torch.linalg.svdvals(ortho)
        # The quintic iteration trades exactness for speed: ~U V^T with singular values in about (0.7, 1.2).
        assert singular.min() > 0.6 and singular.max() < 1.25, (shape, singular.min(), singular.max())
        # With the input's own singular vectors: U^T O V is diagonal (O = U S' V^T, S' ~ 1).
        u, _, vh = torch.linalg.svd(update, full_matrices=False)
        core = u.mT @ ortho @ vh.mT
        off_diagonal = core - torch.diag_embed(torch.diagonal(core, dim1=-2, dim2=-1))
        assert off_diagonal.abs().max() < 1e-3
    stack = torch.randn(4, 40, 24)
    batched = orthogonalize(stack, torch.float32)
    for i in range(4):
        torch.testing.assert_close(batched[i], orthogonalize(stack[i], torch.float32), rtol=1e-5, atol=1e-6)


def two_layer(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64, bias=False), nn.Linear(64, 16, bias=False))


@pytest.mark.parametrize("scale", ["original", "match_rms_adamw"])
def test_muon_steps_exactly_as_torch_optim_muon_in_bfloat16(scale):
    ours, theirs = two_layer(), two_layer()
    mine = MuonWithAdamW([{"params": list(ours.parameters()), "muon": True, "lr": 0.02, "weight_decay": 0.1}],
                         betas=(0.9, 0.95), eps=1e-8, fused=False, momentum=0.95, adjust_lr_fn=scale,
                         ns_dtype=torch.bfloat16)
    reference = torch.optim.Muon(theirs.parameters(), lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn=scale)
    for step in range(3):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(step))
        for model, optimizer in ((ours, mine), (theirs, reference)):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_groups_and_their_rates(tmp_path):
    from gigatrain.config import load_config, resolve_model_args
    from gigatrain.models.transformer import Transformer

    cfg = load_config(None, ["--model.preset=tiny-moe", "--model.tie_embeddings=false", "--model.vocab_size=256",
                             *MUON, "--train.lr=1e-3", "--train.muon_lr=0.05", "--train.embed_lr=0.2", "--train.head_lr=0.004"])
    model = Transformer(resolve_model_args(cfg))
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    roles = {g["role"]: (g, [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups}
    assert roles["embed"][1] == ["tok_embeddings.weight"] and roles["head"][1] == ["output.weight"]
    assert all("router" in n for n in roles["router"][1]) and roles["router"][1]
    assert "layers.0.feed_forward.experts.w1" in roles["matrix"][1] and "layers.0.attention.wq.weight" in roles["matrix"][1]
    assert [g["muon"] for g in optimizer.param_groups] == [g["role"] == "matrix" for g in optimizer.param_groups]
    assert all(p.dim() == 1 for p in roles["vector"][0]["params"]) and roles["vector"][0]["weight_decay"] == 0.0
    set_learning_rate(optimizer, 5e-4)  # half of train.lr: every group at half its own rate
    got = {role: g["lr"] for role, (g, _) in roles.items()}
    assert got == pytest.approx({"matrix": 0.025, "embed": 0.1, "head": 0.002, "router": 5e-4, "vector": 5e-4})
    # AdamW: the same groups, the matrices at train.lr, none of them Muon's.
    adamw = build_optimizer(model, TrainConfig(lr=1e-3, embed_lr=0.2), torch.device("cpu"))
    assert type(adamw) is torch.optim.AdamW and not any(g["muon"] for g in adamw.param_groups)
    set_learning_rate(adamw, 5e-4)
    got = {g["role"]: g["lr"] for g in adamw.param_groups}
    assert got == pytest.approx({"matrix": 5e-4, "embed": 0.1, "head": 5e-4, "router": 5e-4, "vector": 5e-4})


def run_config(run_dir, data, *extra):
    return resolve_run_config(None, [*TINY, f"--run.dir={run_dir}", f"--data.path={data}", *MUON, *extra])


def test_muon_trains_and_resumes_bit_exactly_with_expert_stacks(tmp_path, byte_data):
    """tiny-moe: 3-D [experts, out, in] stacks, each expert's slice orthogonalised as its own matrix."""
    common = ["--model.preset=tiny-moe", "--train.max_steps=8", "--train.checkpoint_every=4", "--train.eval_every=100"]
    straight = train(run_config(tmp_path / "straight", byte_data, *common))
    assert straight.step == 8
    first = train(run_config(tmp_path / "split", byte_data, *common, "--train.stop_at_step=4"))
    assert first.step == 4
    train(resolve_run_config(None, [f"--run.dir={tmp_path / 'split'}"]))
    losses = {name: [r["loss"] for r in RunDir(tmp_path / name).metrics_records() if "loss" in r]
              for name in ("straight", "split")}
    assert losses["split"] == losses["straight"] and len(losses["straight"]) == 8
    assert losses["straight"][-1] < losses["straight"][0] - 0.5  # it learns
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_optimizer_overhead_bench_smoke():
    import subprocess
    import sys

    from helpers import REPO

    result = subprocess.run([sys.executable, str(REPO / "bench/optimizer_overhead.py"), "--smoke"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "muon step-time overhead over adamw:" in result.stdout.splitlines()[-1]
