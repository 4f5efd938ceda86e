"""`gigatrain export`: what transformers loads from it computes what gigatrain computes (logits
within 1e-4 in fp32, the same greedy tokens), from a one-process run and from an FSDP x TP
run's sharded checkpoint; sharded files, --step, bf16, refusals; and host memory holds about
one tensor, never the model."""

import contextlib
import dataclasses
import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from gigatrain.checkpoint.dcp import Checkpointer
from gigatrain.cli import run
from gigatrain.config import load_config, to_dict
from gigatrain.data.tokenizers import make_tokenizer
from gigatrain.models.presets import PRESETS
from gigatrain.models.transformer import ModelArgs, Transformer
from gigatrain.rundir import RunDir
from gigatrain.train.checkpointing import load_run
from gigatrain.train.evaluate import generate
from helpers import REPO, TINY, run_group, torchrun

PROMPT = "def main():\n    "


def train(run_dir: Path, data: Path, *extra: str) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        code = run(["train", *TINY, f"--data.path={data}", f"--run.dir={run_dir}", "--train.max_steps=4",
                    "--train.eval_every=1000", "--train.checkpoint_every=2", "--train.device=cpu", *extra])
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory, byte_data) -> Path:
    return train(tmp_path_factory.mktemp("runs") / "tied", byte_data)


@pytest.fixture(scope="module")
def untied_run(tmp_path_factory, bpe_data) -> Path:
    return train(tmp_path_factory.mktemp("runs") / "untied", bpe_data, "--model.tie_embeddings=false")


def export(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(["export", *args])
    return code, out.getvalue(), err.getvalue()


def assert_same_model(run_dir: Path, folder: Path, generation: bool = True) -> None:
    """transformers' model from `folder` against gigatrain's own (load_run) on the same ids."""
    ours = load_run(run_dir, torch.device("cpu"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert theirs.dtype == torch.float32
    eot = ours.tokenizer.eot_id
    prompt = [eot] + ours.tokenizer.encode(PROMPT)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours.model(ids), atol=1e-4, rtol=0)
    if generation:
        expected = generate(ours.model, prompt, 20, temperature=0, top_k=0, context_len=ours.cfg.data.seq_len,
                            device=torch.device("cpu"), dtype=None, stop_id=eot)
        with torch.no_grad():
            new = theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=20)[0, len(prompt):].tolist()
        if new and new[-1] == eot:  # transformers ends with the eos it stopped at; gigatrain leaves it out
            new = new[:-1]
        assert new == expected


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_transformers_loads_the_export_and_computes_what_gigatrain_does(which, tied_run, untied_run, tmp_path):
    run_dir = {"tied": tied_run, "untied": untied_run}[which]
    code, out, err = export(str(run_dir), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert "exported step 4" in out
    folder = tmp_path / "hf"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                       "tokenizer.json", "tokenizer_config.json"]
    assert list(tmp_path.iterdir()) == [folder]  # the temporary sibling is gone
    config = json.loads((folder / "config.json").read_text())
    eot = load_run(run_dir, torch.device("cpu")).tokenizer.eot_id
    assert (config["bos_token_id"], config["eos_token_id"], config["tie_word_embeddings"]) == (eot, eot, which == "tied")
    assert config["torch_dtype"] == "float32"  # trained on a CPU in fp32
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert ("lm_head.weight" in weights.keys()) == (which == "untied")
    assert_same_model(run_dir, folder)
    # transformers' tokenizer gives the ids the model was trained on: a document is [eot] + text.
    tokenizer = load_run(run_dir, torch.device("cpu")).tokenizer
    assert transformers.AutoTokenizer.from_pretrained(folder)(PROMPT)["input_ids"] == [eot] + tokenizer.encode(PROMPT)


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_export_then_import_gives_back_the_same_weights_bit_for_bit(which, tied_run, untied_run, tmp_path):
    run_dir = {"tied": tied_run, "untied": untied_run}[which]
    assert export(str(run_dir), "--out", str(tmp_path / "hf"), "--dtype", "float32")[0] == 0
    with contextlib.redirect_stdout(io.StringIO()):
        assert run(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    original, back = load_run(run_dir, torch.device("cpu")), load_run(tmp_path / "back", torch.device("cpu"))
    assert back.model.args == original.model.args
    expected = original.model.state_dict()
    got = back.model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    text = "def f(x):\n    return x  # \u00e9\u4e2d \U0001f600\n"
    assert back.tokenizer.encode(text) == original.tokenizer.encode(text)


def test_sharded_output_loads_the_same(tied_run, tmp_path):
    code, out, err = export(str(tied_run), "--out", str(tmp_path / "hf"), "--max-shard-size", "40KB")
    assert code == 0, err
    folder = tmp_path / "hf"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index) == {"metadata", "weight_map"} and sorted(set(index["weight_map"].values())) == files
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(folder / file, "pt") as weights:
            total += sum(weights.get_tensor(name).nbytes for name in weights.keys())
            assert all(index["weight_map"][name] == file for name in weights.keys())
    assert index["metadata"]["total_size"] == total
    assert_same_model(tied_run, folder, generation=False)


def test_step_picks_an_older_checkpoint_and_bf16_holds_the_same_weights(untied_run, tmp_path):
    code, out, err = export(str(untied_run), "--out", str(tmp_path / "step2"), "--step", "2")
    assert code == 0 and "exported step 2" in out, err
    latest = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "step2")
    code, _, err = export(str(untied_run), "--out", str(tmp_path / "bf16"), "--step", "2", "--dtype", "bfloat16")
    assert code == 0, err
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert half.dtype == torch.bfloat16
    full = latest.state_dict()
    for name, tensor in half.state_dict().items():
        assert torch.equal(tensor, full[name].to(torch.bfloat16)), name
    ours = load_run(untied_run, torch.device("cpu")).model.state_dict()  # step 4: not what --step 2 wrote
    assert not torch.equal(full["model.norm.weight"], ours["norm.weight"])


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(untied_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(untied_run, copy)
    newest = copy / "checkpoints" / "step_00000004"
    next(newest.glob("*.distcp")).write_bytes(b"garbage")
    code, out, err = export(str(copy), "--out", str(tmp_path / "hf"))
    assert code == 0 and "exported step 2" in out
    assert "gigatrain: warning: checkpoint" in err and "step_00000004 is damaged" in err
    assert newest.is_dir()  # export reads; it renames nothing


def test_bad_input_is_one_line_and_exit_2(tied_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    cases = [
        ([str(tied_run), "--out", str(tmp_path / "a"), "--step", "3"], "has no checkpoint of step 3 (committed steps: 2, 4)"),
        ([str(tmp_path), "--out", str(tmp_path / "b")], "is not a gigatrain run directory"),
        ([str(tied_run), "--out", str(taken)], "already exists and is not an empty folder"),
        ([str(tied_run), "--out", str(tmp_path / "c"), "--max-shard-size", "5 parsecs"], "--max-shard-size: cannot read"),
        ([str(tied_run), "--out", str(tmp_path / "d"), "--dtype", "float16"], "invalid choice: 'float16'"),
    ]
    for args, words in cases:
        code, out, err = export(*args)
        assert code == 2 and err.count("\n") == 1 and err.startswith("gigatrain: error: ") and words in err, err
    assert (taken / "mine.txt").read_text() == "keep me" and sorted(tmp_path.iterdir()) == [taken]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(str(tied_run), "--out", str(empty))[0] == 0  # an empty folder is taken
    assert (empty / "model.safetensors").is_file()


def random_run(run_dir: Path, args: ModelArgs, *overrides: str) -> Path:
    """A run directory around a random-weights checkpoint of `args` (no training: only what export reads)."""
    cfg = load_config(None, ["--model.preset=tiny", f"--run.dir={run_dir}", *overrides])
    rundir = RunDir(run_dir)
    rundir.path.mkdir(parents=True)
    rundir.write_config(to_dict(cfg), "")
    rundir.write_run_info({"device": "cpu", "model_args": args.__dict__})
    make_tokenizer("byte").save(run_dir)
    checkpointer = Checkpointer(rundir.checkpoints, keep=1, async_save=False)
    assert checkpointer.save(1, [Transformer(args, seed=0)], None, {"step": 1}) >= 0 and checkpointer.wait()
    checkpointer.close()
    return run_dir


def test_a_run_trained_in_bf16_exports_bf16_by_default(tmp_path):
    args = ModelArgs(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=64, vocab_size=256, max_seq_len=64)
    run_dir = random_run(tmp_path / "run", args, "--train.dtype=bfloat16")
    code, out, err = export(str(run_dir), "--out", str(tmp_path / "hf"))
    assert code == 0 and "(bfloat16," in out, err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert "(float32," in export(str(run_dir), "--out", str(tmp_path / "fp32"), "--dtype", "float32")[1]


def export_growth(run_dir: Path, out: Path) -> int:
    """How far an export in a fresh process raises its peak RSS (VmHWM, not ru_maxrss, which
    Linux carries over from the parent across fork and exec)."""
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        import torch._dynamo  # imported by the meta-device model build (torch's refs) on first use: modules, not tensors
        from gigatrain.interop.export import export

        def status(key):
            line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
            return int(line.split()[1]) * 1024

        before = status("VmRSS")
        export(Path({str(run_dir)!r}), Path({str(out)!r}))
        print(json.dumps({{"growth": status("VmHWM") - before}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])["growth"]


def test_export_holds_about_one_tensor_in_memory_not_the_model(tmp_path):
    """A 202 MB fp32 model whose largest tensor is 4.2 MB. Reading one (the tensor DCP loads
    from the file, the one it copies that into) and converting it (the rotary permutation
    copies) hold a few copies of one tensor, and the first export imports a few modules
    (~7 MB): the peak grows by ~25 MB. Bound: 50 MB, a quarter of the model; holding the model
    would grow it by 202 MB or more."""
    args = ModelArgs(n_layers=12, d_model=512, n_heads=8, n_kv_heads=8, ffn_hidden=2048, vocab_size=256,
                     max_seq_len=128, tie_embeddings=False)
    run_dir = random_run(tmp_path / "run", args)
    model_bytes = sum(t.numel() * 4 for t in Transformer(args).state_dict().values())
    assert 190e6 < model_bytes < 210e6
    growth = export_growth(run_dir, tmp_path / "hf")
    assert growth < 50e6, f"peak RSS grew by {growth / 1e6:.0f} MB exporting a {model_bytes / 1e6:.0f} MB model"
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > model_bytes


def test_a_moe_export_holds_one_stacked_expert_tensor_not_the_model(tmp_path):
    """A 235 MB fp32 Mixtral-shaped model whose largest tensors are one layer's stacked experts
    (8 x 512 x 512: 8.4 MB), written out expert by expert as views of it: measured growth
    26-54 MB (the allocator's, not the model's: 4, 8 and 16 layers gave 44, 54, 26 MB). Bound:
    90 MB; holding the model would grow it by 235 MB or more."""
    args = ModelArgs(n_layers=8, d_model=512, n_heads=8, n_kv_heads=8, ffn_hidden=512, vocab_size=256,
                     max_seq_len=128, tie_embeddings=False, n_experts=8, top_k=2)
    run_dir = random_run(tmp_path / "run", args)
    model_bytes = sum(t.numel() * 4 for t in Transformer(args).state_dict().values())
    assert 220e6 < model_bytes < 250e6
    growth = export_growth(run_dir, tmp_path / "hf")
    assert growth < 90e6, f"peak RSS grew by {growth / 1e6:.0f} MB exporting a {model_bytes / 1e6:.0f} MB model"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_export_of_an_fsdp_by_tp_checkpoint_matches_the_one_process_model(byte_data, tmp_path):
    """4 processes, dp_shard=2 x tp=2: each weight is stored as chunks across files; export
    gathers them one weight at a time."""
    run_dir = tmp_path / "run"
    result = run_group(torchrun("--standalone", "--nproc-per-node=4", "-m", "gigatrain", "train", *TINY,
                                f"--data.path={byte_data}", f"--run.dir={run_dir}", "--train.max_steps=2",
                                "--train.eval_every=1000", "--train.checkpoint_every=2", "--train.device=cpu",
                                "--parallel.dp_shard=2", "--parallel.tp=2", "--model.tie_embeddings=false"),
                       timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((run_dir / "checkpoints" / "step_00000002").glob("*.distcp"))) == 4
    code, _, err = export(str(run_dir), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert_same_model(run_dir, tmp_path / "hf", generation=False)


# -- Qwen3, and the mixtures of experts: Mixtral and Qwen3-MoE ----------------------------
ARCH_RUNS = {  # tiny(-moe) with the options each architecture computes (no aux-loss-free bias)
    "qwen3": ["--model.qk_norm=true", "--model.tie_embeddings=false"],
    "mixtral": ["--model.preset=tiny-moe", "--model.bias_update_rate=0", "--model.aux_loss_coef=0.01"],
    "qwen3-moe": ["--model.preset=tiny-moe", "--model.bias_update_rate=0", "--model.qk_norm=true",
                  "--model.n_dense_layers=1", "--model.route_norm=false", "--model.head_dim_override=32"],
}


@pytest.fixture(scope="module")
def arch_runs(tmp_path_factory, byte_data) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("arch-runs")
    return {name: train(runs / name, byte_data, *options) for name, options in ARCH_RUNS.items()}


@pytest.mark.parametrize("which, architecture", [("qwen3", "Qwen3ForCausalLM"), ("mixtral", "MixtralForCausalLM"),
                                                  ("qwen3-moe", "Qwen3MoeForCausalLM")])
def test_a_run_exports_as_its_architecture_and_round_trips_bit_for_bit(which, architecture, arch_runs, tmp_path):
    run_dir = arch_runs[which]
    code, _, err = export(str(run_dir), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    # the hub's layout, one tensor per expert, which from_pretrained converts as it loads
    block, down = ("block_sparse_moe", "w2") if which == "mixtral" else ("mlp", "down_proj")
    assert (f"model.layers.1.{block}.experts.7.{down}.weight" in names) == (which != "qwen3")
    assert not any("expert_bias" in n for n in names)
    assert ("model.layers.1.self_attn.q_norm.weight" in names) == which.startswith("qwen3")
    assert_same_model(run_dir, tmp_path / "hf")

    with contextlib.redirect_stdout(io.StringIO()):
        assert run(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    original, back = load_run(run_dir, torch.device("cpu")), load_run(tmp_path / "back", torch.device("cpu"))
    # An all-MoE Mixtral has no dense MLP: its ffn_hidden comes back as the experts' hidden size.
    assert back.model.args == dataclasses.replace(original.model.args, ffn_hidden=back.model.args.ffn_hidden)
    expected, got = original.model.state_dict(), back.model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_moe_options_no_architecture_computes_are_refused_in_one_line(tmp_path):
    args = dataclasses.replace(PRESETS["tiny-moe"], bias_update_rate=0.0)
    cases = [(dataclasses.replace(args, n_shared_experts=1), "MixtralForCausalLM has no shared experts"),
             (dataclasses.replace(args, router_score="sigmoid"), "model.router_score=sigmoid"),
             (dataclasses.replace(args, attn_softcap=30.0), "model.attn_softcap=30.0")]
    for i, (moe_args, words) in enumerate(cases):
        code, _, err = export(str(random_run(tmp_path / f"run{i}", moe_args)), "--out", str(tmp_path / f"hf{i}"))
        assert code == 2 and err.count("\n") == 1 and err.startswith("gigatrain: error: ") and words in err, err
    # a balancing bias the run learned: refused before anything is written
    run_dir = random_run(tmp_path / "biased", args)
    model = Transformer(args, seed=0)
    model.layers["1"].feed_forward.router.expert_bias[3] = 0.25
    checkpointer = Checkpointer(RunDir(run_dir).checkpoints, keep=2, async_save=False)
    assert checkpointer.save(2, [model], None, {"step": 2}) >= 0 and checkpointer.wait()
    checkpointer.close()
    code, _, err = export(str(run_dir), "--out", str(tmp_path / "biased-hf"))
    assert code == 2 and err.count("\n") == 1, err
    assert "layers.1.feed_forward.router.expert_bias is non-zero" in err and "--model.bias_update_rate=0" in err
    assert not (tmp_path / "biased-hf").exists()
    assert export(str(run_dir), "--out", str(tmp_path / "step1"), "--step", "1")[0] == 0  # its zero-bias step
