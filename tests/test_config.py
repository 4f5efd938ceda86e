import pytest

from gigatrain.config import ConfigError, global_batch_size, load_config, resolve_model_args, to_toml


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\npreset = "tiny"\n[train]\nlr = 1e-3\nmax_steps = 7\n')
    cfg = load_config(path, ["--train.lr=3e-4", "--data.seq_len=64", "--train.compile=true", "--model.n_layers=3"])
    assert cfg.model.preset == "tiny" and cfg.train.max_steps == 7
    assert cfg.train.lr == 3e-4 and cfg.data.seq_len == 64 and cfg.train.compile is True
    assert resolve_model_args(cfg, vocab_size=300).n_layers == 3
    assert resolve_model_args(cfg, vocab_size=300).vocab_size == 300


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
    ("--model.n_kv_heads=3", ["n_kv_heads", "divisible"]),
    ("--parallel.pp_schedule=ZeroBubbleX", ["parallel.pp_schedule", "GPipe", "Interleaved1F1B"]),
    ("--parallel.tp=0", ["parallel.tp", "-1"]),
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
