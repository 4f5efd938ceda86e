"""Named model shapes, from a test-sized model to the published Llama 3 shapes.

``vocab_size`` of the small presets is a placeholder: the trainer replaces it with
the tokenizer's vocabulary. The large presets keep their published vocabulary so
that parameter and FLOP counts (and the planner) match the published models.
"""

from __future__ import annotations

from dataclasses import replace

from gigatrain.models.transformer import ModelArgs

# Sources: Llama 3 herd paper (arXiv:2407.21783) table 3 for 8B/70B/405B;
# the Llama 3.2 1B model card / config.json for 1B; the rotary scaling and the 131,072-token
# context from the Llama 3.1 (8B/70B/405B) and 3.2 (1B) config.json files ("rope_scaling":
# rope_type llama3, factor 8 and 32, low_freq_factor 1, high_freq_factor 4,
# original_max_position_embeddings 8192); GPT-2 small (Radford et al. 2019)
# for 124M, with a SwiGLU MLP of hidden 2048 (= 2/3 * 4 * 768) so the parameter count
# matches GPT-2's GELU MLP of hidden 3072.
PRESETS: dict[str, ModelArgs] = {
    # Tests: a few seconds per hundred steps on one CPU core.
    "tiny": ModelArgs(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256, max_seq_len=256, tie_embeddings=True),
    # Tests of the mixture of experts: tiny with 8 experts, 2 per token, an aux-loss-free bias.
    "tiny-moe": ModelArgs(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256, max_seq_len=256, tie_embeddings=True,
                          n_experts=8, top_k=2, expert_hidden=96, bias_update_rate=1e-3),
    # The default CPU recipe: its shape tuned for held-out bits per byte after 150 s of training on
    # 2 cores (at that budget a narrow model that sees more tokens wins), its options after 60 s
    # with Muon (untied embeddings, QK-norm, zero-initialised residual projections; docs/training.md,
    # "The default recipe"). Its train settings are config.PRESET_RECIPES["cpu-small"].
    "cpu-small": ModelArgs(n_layers=4, d_model=96, n_heads=4, n_kv_heads=2, ffn_hidden=288, vocab_size=4096, max_seq_len=512,
                           tie_embeddings=False, qk_norm=True, zero_init_residual=True),
    "gpt2-124m": ModelArgs(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, ffn_hidden=2048, vocab_size=50257, max_seq_len=1024, tie_embeddings=True),
    "llama3-1b": ModelArgs(n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, ffn_hidden=8192, vocab_size=128256, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True, rope_scaling_factor=32.0),
    "llama3-8b": ModelArgs(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256, max_seq_len=131072, rope_theta=500000.0, rope_scaling_factor=8.0),
    "llama3-70b": ModelArgs(n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, ffn_hidden=28672, vocab_size=128256, max_seq_len=131072, rope_theta=500000.0, rope_scaling_factor=8.0),
    "llama3-405b": ModelArgs(n_layers=126, d_model=16384, n_heads=128, n_kv_heads=8, ffn_hidden=53248, vocab_size=128256, max_seq_len=131072, rope_theta=500000.0, rope_scaling_factor=8.0),
    # Mixtures of experts. Mixtral 8x7B: Jiang et al. 2024 (arXiv:2401.04088) table 1 and
    # mistralai/Mixtral-8x7B-v0.1 config.json (softmax router, top-2 renormalised, rope_theta 1e6,
    # 32,768 positions, untied); 46.7B parameters, 12.9B active per token (Mistral AI's release post).
    "mixtral-8x7b": ModelArgs(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=32000, max_seq_len=32768,
                              rope_theta=1e6, n_experts=8, top_k=2),
    # Grok-1 (xai-org/grok-1: README, run.py, model.py): 64 layers, d_model 6144 = 48 heads x 128,
    # 8 KV heads, 8 experts of hidden 32768 (ffn_size(6144, widening_factor 8)), 2 per token,
    # GeGLU experts (gelu(linear(x)) * linear_v(x)), attention logits 30 * tanh(x / 30), a softmax
    # router whose top-2 probabilities weight the experts as they are (not renormalised), tied
    # embeddings (InOutEmbed.decode), 131,072 tokens, 8,192 positions, rotary base 10000; 314B
    # parameters (README). Not modelled: its embedding and output multipliers and the extra RMSNorm
    # after attention and after the experts (64 x 2 x 6144 gains, 0.8M parameters).
    "grok-1-314b": ModelArgs(n_layers=64, d_model=6144, n_heads=48, n_kv_heads=8, ffn_hidden=32768, vocab_size=131072, max_seq_len=8192,
                             tie_embeddings=True, mlp_activation="gelu", attn_softcap=30.0, n_experts=8, top_k=2, route_norm=False),
    # Qwen3-30B-A3B: Qwen/Qwen3-30B-A3B config.json (48 layers, hidden 2048, 32 query heads and 4 KV
    # heads of head_dim 128, 128 experts of moe_intermediate_size 768, 8 per token, norm_topk_prob
    # true, QK-norm, rope_theta 1e6, rms_norm_eps 1e-6, max_position_embeddings 40960, untied;
    # intermediate_size 6144 is the unused dense size) and its model card: 30.5B parameters, 3.3B
    # activated.
    "qwen3-30b-a3b": ModelArgs(n_layers=48, d_model=2048, n_heads=32, n_kv_heads=4, ffn_hidden=6144, vocab_size=151936, max_seq_len=40960,
                               rope_theta=1e6, norm_eps=1e-6, qk_norm=True, head_dim_override=128,
                               n_experts=128, top_k=8, expert_hidden=768),
}


def get_preset(name: str) -> ModelArgs:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def with_overrides(args: ModelArgs, **overrides) -> ModelArgs:
    """The preset with the given fields replaced; None values leave the preset's."""
    return replace(args, **{k: v for k, v in overrides.items() if v is not None})
