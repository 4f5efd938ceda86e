"""`gigatrain import`: a random Llama built and saved by transformers itself becomes a run
directory whose model computes transformers' logits, which `gigatrain train` continues from
its very weights and `gigatrain generate` samples greedily as transformers does."""

import dataclasses
import json
import shutil

import pytest
import torch
import transformers

from gigatrain.cli import run
from gigatrain.config import TrainConfig
from gigatrain.interop.importer import imported_config
from gigatrain.models.presets import PRESETS
from gigatrain.data.loader import BatchLoader, TokenData
from gigatrain.data.tokenizers import train_bpe
from gigatrain.models.loss import loss_fn
from gigatrain.rundir import RunDir
from gigatrain.train.checkpointing import load_run

TEXT = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # héllo wörld {i}" for i in range(400))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    return train_bpe([TEXT], 300).save(folder)


def hf_folder(path, tokenizer_file, *, tie: bool, llama3: bool, shard: bool = False):
    """A random transformers Llama (GQA) saved with save_pretrained, plus a tokenizer.json; its
    vocabulary (320) has more rows than the tokenizer has ids (at most 300), as many models do."""
    rope = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64}} if llama3 else {}
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      rope_theta=10000.0, tie_word_embeddings=tie, **rope)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path, **({"max_shard_size": "100KB"} if shard else {}))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return model


@pytest.mark.parametrize("tie, llama3, shard", [(True, True, False), (False, False, True)])
def test_imported_model_computes_transformers_logits(tmp_path, tokenizer_file, tie, llama3, shard):
    theirs = hf_folder(tmp_path / "hf", tokenizer_file, tie=tie, llama3=llama3, shard=shard)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == shard
    assert run(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    loaded = load_run(tmp_path / "run", torch.device("cpu"))
    assert loaded.step == 0 and loaded.model.args.vocab_size == 320 and loaded.model.args.tie_embeddings == tie
    assert loaded.model.args.rope_scaling_factor == (8.0 if llama3 else 1.0)
    tokens = torch.randint(0, 320, (2, 300), generator=torch.Generator().manual_seed(0))  # past the original 64
    with torch.no_grad():
        assert torch.allclose(loaded.model.eval()(tokens), theirs(tokens).logits, atol=1e-4, rtol=0)


def test_an_imported_model_does_not_take_the_recipe_of_the_preset_it_is_written_against(tmp_path):
    llama = dataclasses.replace(PRESETS["cpu-small"], vocab_size=320, qk_norm=False, zero_init_residual=False)
    cfg = imported_config(llama, tmp_path / "run")
    assert cfg.model.preset == "cpu-small" and cfg.train == TrainConfig()  # AdamW at train.lr, not cpu-small's Muon recipe


def test_training_continues_the_imported_weights_and_generate_is_transformers_greedy(tmp_path, tokenizer_file, capsys):
    theirs = hf_folder(tmp_path / "hf", tokenizer_file, tie=False, llama3=True)
    out, data = tmp_path / "run", tmp_path / "data"
    assert run(["import", str(tmp_path / "hf"), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").read_bytes() != b""

    # Greedy generation of the imported run is transformers' greedy generation.
    capsys.readouterr()
    assert run(["generate", str(out), "--prompt", "def f1", "--temperature", "0", "--max-new-tokens", "8",
                "--device", "cpu"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    tokenizer = load_run(out, torch.device("cpu")).tokenizer
    prompt = [tokenizer.eot_id] + tokenizer.encode("def f1")
    expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eot_id,
                               pad_token_id=tokenizer.eot_id)[0, len(prompt):].tolist()
    if tokenizer.eot_id in expected:
        expected = expected[:expected.index(tokenizer.eot_id)]
    assert text == "def f1" + tokenizer.decode(expected)

    lines = TEXT.splitlines()
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": "\n".join(lines[i:i + 20])}) + "\n"
                                                   for i in range(0, len(lines), 20)))
    assert run(["prepare", str(tmp_path / "corpus.jsonl"), "--tokenizer", str(out / "tokenizer.json"),
                "--out", str(data)]) == 0
    imported = load_run(out, torch.device("cpu")).model
    assert run(["train", f"--run.dir={out}", f"--data.path={data}", "--data.seq_len=32", "--train.batch_size=4",
                "--train.max_steps=2", "--train.eval_every=100", "--train.samples=0", "--train.progress=off",
                "--train.device=cpu", "--train.async_checkpoint=false"]) == 0
    records = RunDir(out).metrics_records()
    first = next(r for r in records if r.get("step") == 1 and "loss" in r)
    # The first batch of a fresh loader (the import saved no data position): the imported model's loss on it.
    cfg = load_run(out, torch.device("cpu")).cfg
    loader = BatchLoader(TokenData(data).split("train"), 32, 4, seed=cfg.train.seed, rank=0, world_size=1)
    inputs, targets = loader.next_batch()
    with torch.no_grad():
        expected_loss = loss_fn(imported(inputs), targets).item()
    assert first["loss"] == pytest.approx(expected_loss, abs=1e-5)
    start = next(e for e in RunDir(out).event_records() if e["event"] == "start")
    assert start["resumed"] and start["step"] == 0
    assert load_run(out, torch.device("cpu")).step == 2


def one_error_line(capsys, argv) -> str:
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gigatrain: error: "), err
    return err[0]


def test_what_cannot_be_imported_is_one_line_exit_2(tmp_path, tokenizer_file, capsys):
    hf = tmp_path / "hf"
    hf_folder(hf, tokenizer_file, tie=True, llama3=False)
    out = tmp_path / "run"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "is not an empty folder" in one_error_line(capsys, ["import", str(hf), "--out", str(tmp_path / "full")])

    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert "GPT2LMHeadModel is not supported" in one_error_line(capsys, ["import", str(hf), "--out", str(out)])
    (hf / "config.json").write_text(json.dumps(config))

    (hf / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    assert "tokenizer.json is missing" in one_error_line(capsys, ["import", str(hf), "--out", str(out)])
    (hf / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")  # a link out of the folder
    assert "leads outside" in one_error_line(capsys, ["import", str(hf), "--out", str(out)])
    (hf / "tokenizer.json").unlink()
    shutil.copy(tmp_path / "tokenizer.json", hf / "tokenizer.json")

    (hf / "model.safetensors").rename(tmp_path / "model.safetensors")
    (hf / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "safetensors only" in one_error_line(capsys, ["import", str(hf), "--out", str(out)])
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../model.safetensors"}}))
    assert "not a plain file name" in one_error_line(capsys, ["import", str(hf), "--out", str(out)])
    assert not out.exists()


def moe_folder(path, tokenizer_file, architecture: str):
    """A random transformers Mixtral or Qwen3-MoE (GQA, 4 experts, 2 per token) saved with
    save_pretrained (per-expert tensors, as on the hub); router weights wide enough that no two
    experts tie within rounding."""
    common = dict(vocab_size=320, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, num_experts_per_tok=2, tie_word_embeddings=False)
    if architecture == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=48, num_hidden_layers=2, num_local_experts=4, **common)
    else:
        config = transformers.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=3,
                                             num_experts=4, mlp_only_layers=[0], norm_topk_prob=True, head_dim=32,
                                             **common)
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gate.weight"):
                param.normal_(0, 0.5)
    model.save_pretrained(path)
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return model


@pytest.mark.parametrize("architecture", ["mixtral", "qwen3_moe"])
def test_imported_moe_model_computes_transformers_logits(tmp_path, tokenizer_file, architecture):
    theirs = moe_folder(tmp_path / "hf", tokenizer_file, architecture)
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as file:
        assert any(".experts.3." in name for name in file.keys())  # what save_pretrained writes: per expert
    assert run(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    loaded = load_run(tmp_path / "run", torch.device("cpu"))
    args = loaded.model.args
    assert (args.n_experts, args.top_k, args.bias_update_rate, args.qk_norm) == (4, 2, 0.0, architecture == "qwen3_moe")
    assert all(not buffer.any() for name, buffer in loaded.model.named_buffers() if name.endswith("expert_bias"))
    tokens = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.model.eval()(tokens), theirs(tokens).logits, atol=1e-4, rtol=0)

    # transformers 5's in-memory layout (experts fused: gate_up_proj, down_proj), saved as it is
    from safetensors.torch import save_file

    fused = tmp_path / "fused"
    shutil.copytree(tmp_path / "hf", fused)
    save_file({name: tensor.contiguous() for name, tensor in theirs.state_dict().items()}, fused / "model.safetensors")
    assert run(["import", str(fused), "--out", str(tmp_path / "fused-run")]) == 0
    again = load_run(tmp_path / "fused-run", torch.device("cpu")).model.state_dict()
    assert all(torch.equal(again[name], tensor) for name, tensor in loaded.model.state_dict().items())


def test_a_moe_folder_missing_an_expert_is_one_line(tmp_path, tokenizer_file, capsys):
    moe_folder(tmp_path / "hf", tokenizer_file, "mixtral")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "hf" / "model.safetensors")
    del weights["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    line = one_error_line(capsys, ["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    assert "the weights lack layers.1.feed_forward.experts.w3[2]" in line
