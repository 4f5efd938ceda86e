"""Parameter and FLOP counts against hand-computed values, and against the real module."""

from dataclasses import replace

import torch

from gigatrain.models.flops import param_counts, training_flops_per_token
from gigatrain.models.presets import PRESETS, get_preset
from gigatrain.models.transformer import Transformer


def test_tiny_counts_by_hand():
    # tiny: L=2, d=64, H=4, kv=2 (head_dim 16), ffn=192, V=256, tied embeddings.
    embedding = 256 * 64  # 16_384
    attention = 64 * 64 + 2 * 64 * (2 * 16) + 64 * 64  # q, k, v, o = 12_288
    mlp = 3 * 64 * 192  # 36_864
    norms = (2 * 2 + 1) * 64  # 320
    assert param_counts(get_preset("tiny")).total == embedding + 2 * (attention + mlp) + norms == 115_008
    # 6 * (linear layers + LM head) + 12 * L * H * head_dim * seq, at seq 128:
    # 6 * (2 * 49_152 + 16_384) + 12 * 2 * 4 * 16 * 128 = 688_128 + 196_608
    assert training_flops_per_token(get_preset("tiny"), 128) == 884_736


def test_llama3_8b_counts_by_hand():
    # L=32, d=4096, H=32, kv=8 (head_dim 128), ffn=14336, V=128256, untied: the published 8.03B.
    attention = 4096 * 4096 * 2 + 2 * 4096 * 1024  # 41_943_040
    mlp = 3 * 4096 * 14336  # 176_160_768
    embedding = 128256 * 4096  # 525_336_576, and the same again for the untied head
    norms = 65 * 4096
    assert param_counts(get_preset("llama3-8b")).total == 32 * (attention + mlp) + 2 * embedding + norms == 8_030_261_248
    # 6 * (6_979_321_856 + 525_336_576) + 12 * 32 * 32 * 128 * 8192
    assert training_flops_per_token(get_preset("llama3-8b"), 8192) == 45_027_950_592 + 12_884_901_888


def test_published_sizes():
    expected_billions = {"gpt2-124m": 0.1236, "llama3-1b": 1.236, "llama3-70b": 70.55, "llama3-405b": 405.85}
    for name, billions in expected_billions.items():
        assert abs(param_counts(get_preset(name)).total / 1e9 - billions) / billions < 2e-3, name


def test_counts_match_the_module():
    for name, args in PRESETS.items():
        with torch.device("meta"):
            model = Transformer(args)
        assert sum(p.numel() for p in model.parameters()) == param_counts(args).total, name


def test_rotary_scaling_and_context_change_no_parameter_or_flop_count():
    """The rotary tables are computed, not learned, and FLOPs count the trained sequence length."""
    scaled = get_preset("llama3-8b")
    plain = replace(scaled, rope_scaling_factor=1.0, max_seq_len=8192)
    assert scaled.max_seq_len == 131072 and param_counts(scaled) == param_counts(plain)
    assert training_flops_per_token(scaled, 8192) == training_flops_per_token(plain, 8192)
