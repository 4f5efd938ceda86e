"""Attention options beyond Llama 3: QK-norm (Qwen3), a head size apart from d_model / n_heads
(Qwen3-30B-A3B), logit soft-capping (Grok-1)."""

import math

import torch
import torch.nn.functional as F

from gigatrain.models.presets import get_preset, with_overrides
from gigatrain.models.transformer import Attention, Transformer, apply_rope, rope_tables


def reference_attention(attn: Attention, x, cos, sin, n_heads, n_kv_heads, head_dim, eps, softcap=0.0):
    """Written from the definitions: per-head RMSNorm of q and k (when the module has it), rotary,
    causal softmax over (capped) logits, grouped-query heads by repetition."""
    batch, seq, _ = x.shape
    q = (x @ attn.wq.weight.T).view(batch, seq, n_heads, head_dim)
    k = (x @ attn.wk.weight.T).view(batch, seq, n_kv_heads, head_dim)
    v = (x @ attn.wv.weight.T).view(batch, seq, n_kv_heads, head_dim)
    if attn.q_norm is not None:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + eps) * attn.q_norm.weight
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + eps) * attn.k_norm.weight
    q, k = apply_rope(q, cos[:seq], sin[:seq]), apply_rope(k, cos[:seq], sin[:seq])
    k = k.repeat_interleave(n_heads // n_kv_heads, dim=2)
    v = v.repeat_interleave(n_heads // n_kv_heads, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, n_heads * head_dim)
    return out @ attn.wo.weight.T


def test_qk_norm_normalises_each_head_before_rotary():
    args = with_overrides(get_preset("tiny"), qk_norm=True)
    torch.manual_seed(0)
    model = Transformer(args)
    attn = model.layers["0"].attention
    assert dict(attn.named_parameters())["q_norm.weight"].shape == (args.head_dim,)
    assert "layers.0.attention.k_norm.weight" in model.state_dict()
    with torch.no_grad():  # gains other than the initial ones, so that a missing gain shows
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 10, args.d_model)
    cos, sin = rope_tables(args)
    expected = reference_attention(attn, x, cos, sin, args.n_heads, args.n_kv_heads, args.head_dim, args.norm_eps)
    torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-6)


def test_qk_norm_off_adds_no_parameters():
    names = set(Transformer(get_preset("tiny")).state_dict())
    assert not any("q_norm" in n or "k_norm" in n for n in names)


def test_head_dim_override_widens_the_heads():
    # Qwen3-30B-A3B's shape in small: 4 heads of 32 features on a d_model of 64.
    args = with_overrides(get_preset("tiny"), head_dim_override=32, qk_norm=True)
    assert args.head_dim == 32 and get_preset("tiny").head_dim == 16
    torch.manual_seed(0)
    model = Transformer(args)
    attn = model.layers["0"].attention
    assert attn.wq.weight.shape == (4 * 32, 64) and attn.wk.weight.shape == (2 * 32, 64)
    assert attn.wo.weight.shape == (64, 4 * 32) and model.rope_cos.shape == (args.max_seq_len, 16)
    x = torch.randn(2, 9, args.d_model)
    expected = reference_attention(attn, x, model.rope_cos, model.rope_sin, 4, 2, 32, args.norm_eps)
    torch.testing.assert_close(attn(x, model.rope_cos, model.rope_sin), expected, rtol=1e-5, atol=1e-6)


def test_softcap_caps_the_logits_before_the_causal_softmax():
    args = with_overrides(get_preset("tiny"), attn_softcap=0.5)
    torch.manual_seed(0)
    model = Transformer(args)
    attn = model.layers["0"].attention
    with torch.no_grad():  # logits far beyond the cap, so that capping changes the result
        attn.wq.weight.mul_(40)
    x = torch.randn(2, 10, args.d_model)
    cos, sin = rope_tables(args)
    capped = reference_attention(attn, x, cos, sin, 4, 2, 16, args.norm_eps, softcap=0.5)
    uncapped = reference_attention(attn, x, cos, sin, 4, 2, 16, args.norm_eps)
    assert (capped - uncapped).abs().max() > 1e-2
    torch.testing.assert_close(attn(x, cos, sin), capped, rtol=1e-5, atol=1e-6)
    # Still causal: a later token does not change an earlier output.
    changed = x.clone()
    changed[:, 7] += 1
    torch.testing.assert_close(attn(changed, cos, sin)[:, :7], attn(x, cos, sin)[:, :7])


def test_no_softcap_keeps_the_fused_attention():
    """Without a cap, attention is SDPA's, bit for bit (the dense runs' golden losses rest on it)."""
    args = get_preset("tiny")
    torch.manual_seed(0)
    attn = Transformer(args).layers["0"].attention
    q, k, v = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    assert torch.equal(attn.core(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
