import torch
import torch.nn.functional as F

from gigatrain.models.presets import get_preset, with_overrides
import math

from gigatrain.models.transformer import ModelArgs, Transformer, apply_rope, rope_frequencies, rope_tables


def tiny(**overrides):
    torch.manual_seed(0)
    return Transformer(with_overrides(get_preset("tiny"), **overrides))


def test_overfits_one_batch():
    model = tiny(vocab_size=64)
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Random tokens start at ln(64) = 4.16 nats; memorising 4 x 32 of them drives the loss near 0.
    assert loss.item() < 0.05


def test_causal():
    model = tiny()
    tokens = torch.randint(0, 256, (1, 16))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 256
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[0, :10], b[0, :10])
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_grouped_query_attention_equals_repeated_heads():
    """GQA with 2 kv heads equals full attention whose k/v projections repeat each kv head."""
    gqa = tiny(n_kv_heads=2)
    full = tiny(n_kv_heads=4)
    shared = {k: v for k, v in gqa.state_dict().items() if not k.endswith(("wk.weight", "wv.weight"))}
    full.load_state_dict(shared, strict=False)
    head_dim = gqa.args.head_dim
    for name, block in gqa.layers.items():
        for proj in ("wk", "wv"):
            weight = getattr(block.attention, proj).weight.view(2, head_dim, -1)
            getattr(full.layers[name].attention, proj).weight.data = weight.repeat_interleave(2, dim=0).reshape(4 * head_dim, -1)
    tokens = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(gqa(tokens), full(tokens))


def test_rope_preserves_norm_and_is_relative():
    cos, sin = rope_tables(ModelArgs(n_layers=1, d_model=16, n_heads=1, n_kv_heads=1, ffn_hidden=16, vocab_size=8, max_seq_len=32))
    q = torch.randn(1, 32, 1, 16)
    rotated = apply_rope(q, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1))
    # The score between positions depends only on their distance.
    k = torch.randn(1, 1, 1, 16)
    k_all = k.expand(1, 32, 1, 16)
    q_all = q[:, :1].expand(1, 32, 1, 16)
    qr, kr = apply_rope(q_all, cos, sin), apply_rope(k_all, cos, sin)
    score_3_1 = (qr[0, 3] * kr[0, 1]).sum()
    score_12_10 = (qr[0, 12] * kr[0, 10]).sum()
    torch.testing.assert_close(score_3_1, score_12_10)


def test_rope_scaling_slows_long_wavelengths_keeps_short_ones_and_is_off_by_default():
    plain = ModelArgs(n_layers=1, d_model=256, n_heads=2, n_kv_heads=2, ffn_hidden=16, vocab_size=8, max_seq_len=64,
                      rope_theta=500000.0)
    # The default path computes the very tables it always did (the golden losses depend on them).
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    assert torch.equal(rope_tables(plain)[0], torch.outer(torch.arange(64, dtype=torch.float64), freqs).cos().float())
    scaled = rope_frequencies(ModelArgs(**{**plain.__dict__, "rope_scaling_factor": 8.0, "rope_original_max_seq_len": 64}))
    wavelengths = 2 * math.pi / freqs
    assert torch.equal(scaled[wavelengths < 64 / 4], freqs[wavelengths < 64 / 4])
    assert torch.equal(scaled[wavelengths > 64], freqs[wavelengths > 64] / 8)
    between = (wavelengths >= 16) & (wavelengths <= 64)
    assert between.any() and torch.all((scaled[between] < freqs[between]) & (scaled[between] > freqs[between] / 8))


def test_tied_embeddings_share_storage():
    model = tiny()
    assert model.output.weight is model.tok_embeddings.weight
    untied = tiny(tie_embeddings=False)
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_initialisation_is_a_function_of_seed_and_parameter_name():
    """What lets a rank that holds one shard draw exactly one process's numbers for it."""
    from gigatrain.models.transformer import init_parameter, parameter_generator

    args = get_preset("tiny")
    a, b, other = Transformer(args, seed=3), Transformer(args, seed=3), Transformer(args, seed=4)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), other.parameters()):
        assert torch.equal(p, q), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(p, r), name
        alone = torch.empty_like(p)
        init_parameter(name, alone, args, parameter_generator(3, name, p.device))
        assert torch.equal(alone, p), name
    assert torch.all(a.layers["0"].attention_norm.weight == 1)
    residual = a.layers["1"].feed_forward.w2.weight.std().item()
    assert abs(residual - 0.02 / (2 * args.n_layers) ** 0.5) < 0.003
    assert abs(a.layers["1"].feed_forward.w1.weight.std().item() - 0.02) < 0.002


def test_meta_model_initialised_later_equals_an_eager_one():
    args = get_preset("tiny")
    with torch.device("meta"):
        late = Transformer(args, seed=5)
    late.to_empty(device="cpu")
    late.init_weights(5)
    for (name, p), q in zip(Transformer(args, seed=5).state_dict().items(), late.state_dict().values()):
        assert torch.equal(p, q), name
    assert torch.equal(late.rope_cos, Transformer(args).rope_cos)
    assert late.output.weight is late.tok_embeddings.weight  # still tied
