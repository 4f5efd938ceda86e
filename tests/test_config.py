import pytest

import dataclasses

from gigatrain.config import (MODEL_OVERRIDES, PRESET_RECIPES, ConfigError, TrainConfig, from_dict, global_batch_size, load_config,
                              resolve_model_args, to_dict, to_toml)
from gigatrain.models.presets import PRESETS
from gigatrain.models.transformer import ModelArgs
from helpers import REPO


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\npreset = "tiny"\n[train]\nlr = 1e-3\nmax_steps = 7\n')
    cfg = load_config(path, ["--train.lr=3e-4", "--data.seq_len=64", "--train.compile=true", "--model.n_layers=3"])
    assert cfg.model.preset == "tiny" and cfg.train.max_steps == 7
    assert cfg.train.lr == 3e-4 and cfg.data.seq_len == 64 and cfg.train.compile is True
    assert resolve_model_args(cfg, vocab_size=300).n_layers == 3
    assert resolve_model_args(cfg, vocab_size=300).vocab_size == 300


def test_every_model_field_can_be_overridden_and_vocab_size_may_exceed_the_tokenizers():
    """An imported model's shape is a preset plus overrides, whatever it is."""
    assert set(MODEL_OVERRIDES) == {field.name for field in dataclasses.fields(ModelArgs)}
    cfg = load_config(None, ["--model.preset=tiny", "--model.rope_scaling_factor=8", "--model.rope_original_max_seq_len=64",
                             "--model.rope_theta=500000", "--model.norm_eps=1e-6", "--model.max_seq_len=1024",
                             "--model.vocab_size=320"])
    args = resolve_model_args(cfg, vocab_size=300)
    assert (args.rope_scaling_factor, args.rope_original_max_seq_len, args.rope_theta, args.norm_eps, args.max_seq_len,
            args.vocab_size) == (8.0, 64, 500000.0, 1e-6, 1024, 320)
    with pytest.raises(ConfigError, match="model.vocab_size=320 is smaller than the tokenizer's vocabulary"):
        resolve_model_args(cfg, vocab_size=400)


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ["--model.preset=tiny", "--train.schedule=wsd", "--run.name=x y \"z\""])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("override, words", [
    ("--train.lrr=1", ["train.lrr", "lr"]),
    ("--bogus.key=1", ["bogus.key", "train"]),
    ("--train.lr=fast", ["train.lr", "number"]),
    ("--train.max_steps=1.5", ["train.max_steps", "integer"]),
    ("--train.compile=maybe", ["train.compile", "true or false"]),
    ("--train.schedule=linear", ["train.schedule", "cosine", "wsd"]),
    ("--model.preset=gpt5", ["model.preset", "llama3-8b"]),
    ("--train.lr=-1", ["train.lr", "positive"]),
    ("--train.optimizer=sgd", ["train.optimizer='sgd'", "adamw", "muon"]),
    ("--train.muon_lr=1.5", ["train.muon_lr=1.5", "(0, 1)"]),
    ("--train.muon_lr=0", ["train.muon_lr=0", "(0, 1)"]),
    ("--train.muon_momentum=1", ["train.muon_momentum=1", "[0, 1)"]),
    ("--train.embed_lr=-0.1", ["train.embed_lr=-0.1", "0 for train.lr"]),
    ("--train.head_lr=-1", ["train.head_lr=-1", "0 for train.lr"]),
    ("--train.muon_scale=spectral", ["train.muon_scale", "original", "match_rms_adamw"]),
    ("--model.n_kv_heads=3", ["n_kv_heads", "divisible"]),
    ("--model.rope_scaling_factor=0.5", ["model.rope_scaling_factor", "1 (no scaling)"]),
    ("--model.rope_low_freq_factor=4", ["model.rope_high_freq_factor", "above"]),
    ("--parallel.pp_schedule=ZeroBubbleX", ["parallel.pp_schedule", "GPipe", "Interleaved1F1B"]),
    ("--parallel.tp=0", ["parallel.tp", "-1"]),
    ("--fault.memory_every=0", ["fault.memory_every=0", "at least 1"]),
    ("--fault.ranks_per_host=-1", ["fault.ranks_per_host=-1", "LOCAL_WORLD_SIZE"]),
    ("train.lr", ["--section.key=value"]),
    ("--train.batch_tokens=1000", ["train.batch_tokens=1000", "data.seq_len=256", "768"]),
])
def test_bad_input_names_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_toml_types(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlr = "high"\n')
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(path)
    path.write_text("train = 3\n")
    with pytest.raises(ConfigError, match="section"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_global_batch_in_tokens():
    cfg = load_config(None, ["--data.seq_len=64", "--train.batch_size=4", "--train.batch_tokens=1024"])
    assert global_batch_size(cfg) == 16
    assert cfg.train.batch_size == 4  # validation checks values, it does not rewrite them


def test_a_plain_run_takes_the_default_presets_recipe_and_explicit_values_win(tmp_path):
    plain = load_config()
    assert plain.model.preset == "cpu-small"
    assert (plain.train.optimizer, plain.train.embed_lr, plain.train.head_lr) == ("muon", 0.2, 0.012)
    args = resolve_model_args(plain)
    assert (args.tie_embeddings, args.qk_norm, args.zero_init_residual) == (False, True, True)
    assert load_config(REPO / "configs/cpu.toml") == plain  # it says it spells out the defaults
    # Each recipe key gives way on its own, to the file and to the command line.
    path = tmp_path / "c.toml"
    path.write_text('[train]\nembed_lr = 0.1\noptimizer = "muon"\n')
    cfg = load_config(path, ["--train.optimizer=adamw"])
    assert (cfg.train.optimizer, cfg.train.embed_lr, cfg.train.head_lr) == ("adamw", 0.1, 0.012)
    # The preset that is finally chosen brings its recipe, wherever it was chosen.
    path.write_text('[model]\npreset = "cpu-small"\n')
    assert load_config(path, ["--model.preset=tiny"]).train == TrainConfig()
    assert load_config(REPO / "configs/tiny.toml", ["--model.preset=cpu-small"]).train.optimizer == "muon"
    # A saved run's config (resume) is taken as it was, the recipe not laid under it again.
    before = load_config(None, ["--train.optimizer=adamw", "--train.embed_lr=0", "--train.head_lr=0"])
    assert from_dict(to_dict(before)) == before


def test_the_other_presets_train_with_the_plain_defaults():
    """The published presets' rates are not cpu-small's: AdamW at train.lr for every group."""
    others = [name for name in PRESETS if name not in PRESET_RECIPES]
    assert "gpt2-124m" in others and "llama3-1b" in others and "tiny" in others
    for preset in others:
        assert load_config(None, [f"--model.preset={preset}"]).train == TrainConfig(), preset
