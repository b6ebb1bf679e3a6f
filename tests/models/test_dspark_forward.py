"""The DSpark drafter's forward (modeling_deepseek_v4/dspark_drafting.py) against a reference written here from the
spec (docs/dspark.md §2.4), never by calling the functions under test:

- context keys: `rope(kv_norm(kv_proj(main_norm(main_proj(taps)))))` per stage, with our own interleaved rotation;
- the ring: uneven chunks of committed positions keep exactly the last `window` of them, at slot `pos % window`;
- one draft block: embeddings, mHC stages (the mHC and MoE modules as black boxes, tested elsewhere) around our own
  DSpark attention (ring + whole block, no causal mask, per-head sink, V = K, inverse RoPE, grouped output), the
  head, the Markov loop and the confidence head; plus checks that the block is bidirectional and reads the ring;
- end to end through `generate(use_dspark=True)`: the ring left behind equals the context keys of taps from a plain
  forward of the whole committed sequence (with and without accepted drafts, so multi-position writes happen).

A wrong rope position, a causal mask, a missing sink, a mis-tapped layer or a ring slot off by one all move the
numbers by far more than the 1e-5 tolerance (fp32 throughout; the tiny model's sinks, hc bases and the drafter's
norm weights are randomized so that each of them matters).
"""

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseek_v4 import dspark_drafting
from modeling_deepseek_v4.dspark_drafting import DeepseekV4DSparkCandidateGenerator, DSparkRing, context_keys
from tests.conftest import tiny_dspark_model

ATOL = 1e-5
KW = dict(pad_token_id=0, eos_token_id=None, do_sample=False)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def dspark_model(seed: int = 0):
    model = tiny_dspark_model(seed=seed)
    # Weights at the init scale (std 0.02) would leave the Markov bias and the confidence logit near zero and the
    # norm weights at 1: scale them so that a swapped norm or a dropped Markov term is far above the tolerance.
    with torch.no_grad():
        for name, param in model.model.dspark.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif "markov_head" in name:
                param.normal_(0.0, 0.4)
            elif "confidence_head" in name:
                param.normal_(0.0, 0.3)
    return model


# ------------------------------------------------------------------------------------------------ reference math


def rms(x, weight, eps):
    """RMSNorm in fp32; weight None is the unweighted per-head norm of the queries."""
    x = x.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.float()


def inv_freq_of(model):
    """Inverse frequencies of the "main" rope (theta 10000, no scaling) over the last qk_rope_head_dim dims."""
    r = model.config.qk_rope_head_dim
    theta = float(model.config.rope_parameters["main"]["rope_theta"])
    return 1.0 / theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r)


def rotate(x, positions, inv_freq, inverse=False):
    """Interleaved RoPE: pairs (2i, 2i+1) of the last 2 * len(inv_freq) dims, angle pos * inv_freq[i].
    x `[B, n, D]` or `[B, n, H, D]`, positions `[n]`."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    if inverse:
        angles = -angles
    cos, sin = angles.cos(), angles.sin()
    if x.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]
    r = 2 * inv_freq.numel()
    a, b = x[..., -r:][..., 0::2], x[..., -r:][..., 1::2]
    rotated = torch.empty_like(x[..., -r:])
    rotated[..., 0::2] = a * cos - b * sin
    rotated[..., 1::2] = a * sin + b * cos
    return torch.cat([x[..., :-r], rotated], dim=-1)


def ref_context_keys(model, taps, positions):
    drafter, eps = model.model.dspark, model.config.rms_norm_eps
    main_x = rms(F.linear(taps, drafter.main_proj.weight), drafter.main_norm.weight, eps)
    keys = []
    for layer in drafter.layers:
        attn = layer.self_attn
        kv = rms(F.linear(main_x, attn.kv_proj.weight), attn.kv_norm.weight, eps)
        keys.append(rotate(kv, positions, inv_freq_of(model)))
    return keys


def ref_attention(model, attn, x, ring_keys, positions):
    """DSpark attention of the block x `[B, W, d]` (normed) over ring_keys `[B, n, D]` and the block's own keys."""
    b, w, _ = x.shape
    h, d, eps, inv_freq = attn.num_heads, attn.head_dim, model.config.rms_norm_eps, inv_freq_of(model)
    q = F.linear(rms(F.linear(x, attn.q_a_proj.weight), attn.q_a_norm.weight, eps), attn.q_b_proj.weight)
    q = rotate(rms(q.view(b, w, h, d), None, eps), positions, inv_freq)
    kv = rotate(rms(F.linear(x, attn.kv_proj.weight), attn.kv_norm.weight, eps), positions, inv_freq)
    keys = torch.cat([ring_keys, kv], dim=1)  # every query sees every key: no causal mask inside the block
    scores = torch.einsum("bqhd,bkd->bhqk", q, keys) * d**-0.5
    sink = attn.sinks.float().view(1, h, 1, 1).expand(b, h, w, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    out = rotate(torch.einsum("bhqk,bkd->bqhd", probs, keys), positions, inv_freq, inverse=True)  # V = K
    g = attn.o_groups
    w_a = attn.o_a_proj.weight.view(g, -1, h * d // g)  # group j: rows [j d_g, (j + 1) d_g), heads of slice j
    out = torch.einsum("bwgi,goi->bwgo", out.reshape(b, w, g, h * d // g), w_a).reshape(b, w, -1)
    return F.linear(out, attn.o_b_proj.weight)


def ref_hc_head(head, x, norm_eps):
    """y = sum_i (sigmoid(mix_i * scale + base_i) + eps) x_i with mix = rms-scaled flat streams . fn^T."""
    flat = x.flatten(-2)
    mix = F.linear(flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + norm_eps), head.hc_fn)
    pre = torch.sigmoid(mix * head.hc_scale + head.hc_base) + head.eps
    return (pre.unsqueeze(-1) * x).sum(-2)


def ref_draft_block(model, anchor, ring_keys, p):
    """Tokens `[W]`, Markov-corrected logits `[W, V]`, confidence `[W]` of the block drafted after position p."""
    drafter, cfg = model.model.dspark, model.config
    w, eps = cfg.dspark_block_size, cfg.rms_norm_eps
    ids = torch.tensor([[anchor] + [cfg.dspark_noise_token_id] * (w - 1)])
    positions = torch.arange(p + 1, p + 1 + w)
    x = model.model.embed_tokens.weight[ids].unsqueeze(2).repeat(1, 1, cfg.hc_mult, 1)
    for s, layer in enumerate(drafter.layers):
        collapsed, post, comb = layer.attn_hc(x)
        out = ref_attention(
            model, layer.self_attn, rms(collapsed, layer.input_layernorm.weight, eps), ring_keys[s], positions
        )
        x = layer.attn_hc.expand(out, x, post, comb)
        collapsed, post, comb = layer.ffn_hc(x)
        out = layer.mlp(rms(collapsed, layer.post_attention_layernorm.weight, eps))[0]
        x = layer.ffn_hc.expand(out, x, post, comb)
    y = ref_hc_head(drafter.hc_head, x, eps)[0]
    logits = F.linear(rms(y, drafter.norm.weight, eps), model.lm_head.weight.float())
    w1, w2 = drafter.markov_head.markov_w1.weight, drafter.markov_head.markov_w2.weight
    tokens, rows, confidence, prev = [], [], [], anchor
    for i in range(w):
        e = w1[prev]
        row = logits[i] + w2 @ e
        confidence.append(drafter.confidence_head.proj.weight[0] @ torch.cat([y[i], e]))
        prev = int(row.argmax())
        tokens.append(prev)
        rows.append(row)
    return torch.tensor(tokens), torch.stack(rows), torch.stack(confidence)


def cos_sin(model, positions):
    cos, sin = model.model.rope_tables.cos_sin("main", positions)
    return cos.unsqueeze(0), sin.unsqueeze(0)


def greedy_pick(row, i):
    return row.argmax(-1)


# ------------------------------------------------------------------------------------------------------- tests


@torch.no_grad()
def test_context_keys_equal_reference():
    model = dspark_model()
    q, n = 37, 11
    positions = torch.arange(q, q + n)
    # our own cos / sin from theta agree with the model's "main" table (so the rotation below uses the same angles)
    cos, sin = model.model.rope_tables.cos_sin("main", positions)
    angles = positions.float()[:, None] * inv_freq_of(model)
    torch.testing.assert_close(cos, angles.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, angles.sin(), atol=1e-6, rtol=0)

    taps = torch.randn(2, n, 3 * model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    got = context_keys(model.model.dspark, taps, *cos_sin(model, positions))
    want = ref_context_keys(model, taps, positions)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        assert g.shape == (2, n, model.config.head_dim)
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    # the rotation is at the given positions: the same taps one position later give other keys
    shifted = context_keys(model.model.dspark, taps, *cos_sin(model, positions + 1))
    assert (shifted[0] - want[0]).abs().max() > 1e-2


def test_ring_keeps_last_window_positions():
    window, total, stages = 128, 300, 2
    gen = torch.Generator().manual_seed(2)
    keys = [torch.randn(2, total, 16, generator=gen) for _ in range(stages)]
    ring, start = DSparkRing(stages, window), 0
    # uneven chunks, one of them longer than the window (older positions of that very write must not survive)
    for size in [5, 150, 1, 17, 127]:
        pos = torch.arange(start, start + size)
        ring.write([k[:, pos] for k in keys], pos)
        start += size
        kept = torch.arange(max(0, start - window), start)
        assert sorted(ring.positions[ring.positions >= 0].tolist()) == kept.tolist()
        assert (ring.positions[kept % window] == kept).all()
        for s in range(stages):
            torch.testing.assert_close(ring.keys[s][:, kept % window], keys[s][:, kept], atol=0, rtol=0)
            valid = ring.valid(s)
            assert valid.shape == (2, kept.numel(), 16)
            # valid() is in slot order; the positions tensor tells which position each valid slot holds
            torch.testing.assert_close(valid, keys[s][:, ring.positions[ring.positions >= 0]], atol=0, rtol=0)
    assert start == total


def filled_ring(model, p, gen):
    """A ring holding random context keys of positions max(0, p - window + 1) .. p (two writes, wrapping)."""
    window = model.config.sliding_window
    positions = torch.arange(max(0, p - window + 1), p + 1)
    keys = [torch.randn(1, positions.numel(), model.config.head_dim, generator=gen) for _ in range(3)]
    ring, half = DSparkRing(3, window), positions.numel() // 2
    ring.write([k[:, :half] for k in keys], positions[:half])
    ring.write([k[:, half:] for k in keys], positions[half:])
    return ring, keys


def run_block(model, ring, anchor, p, embeds=None):
    w = model.config.dspark_block_size
    ids = torch.full((1, w), model.config.dspark_noise_token_id)
    ids[0, 0] = anchor
    embeds = model.model.embed_tokens(ids) if embeds is None else embeds
    cos, sin = cos_sin(model, torch.arange(p + 1, p + 1 + w))
    return dspark_drafting.draft_block(
        model.model.dspark, embeds, ring, cos, sin, torch.tensor([anchor]), model.lm_head, greedy_pick
    )


@pytest.mark.parametrize("p,anchor", [(3, 17), (40, 5), (131, 88)])  # ring not full; full, slots wrapping
@torch.no_grad()
def test_draft_block_equals_reference(p, anchor):
    model = dspark_model()
    ring, keys = filled_ring(model, p, torch.Generator().manual_seed(p))
    tokens, logits, confidence = run_block(model, ring, anchor, p)
    want_tokens, want_logits, want_conf = ref_draft_block(model, anchor, keys, p)
    assert tokens[0].tolist() == want_tokens.tolist()
    torch.testing.assert_close(logits[0], want_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(confidence[0], want_conf, atol=ATOL, rtol=0)
    assert logits.dtype == confidence.dtype == torch.float32
    # confidence and logits are far from zero at these weights (else the 1e-5 comparison would prove little)
    assert want_conf.abs().max() > 0.1
    assert want_logits.std() > 0.1


@torch.no_grad()
def test_draft_block_is_bidirectional_and_reads_the_ring():
    model = dspark_model()
    p, anchor = 40, 5
    ring, _ = filled_ring(model, p, torch.Generator().manual_seed(3))
    _, base, _ = run_block(model, ring, anchor, p)
    w = model.config.dspark_block_size
    ids = torch.full((1, w), model.config.dspark_noise_token_id)
    ids[0, 0] = anchor
    embeds = model.model.embed_tokens(ids).clone()
    embeds[0, -1] += torch.randn(embeds.shape[-1], generator=torch.Generator().manual_seed(4))
    _, changed, _ = run_block(model, ring, anchor, p, embeds)
    # row 0 (the anchor's row) sees the last row's input: a causal block would leave it bit-identical
    assert (changed[0, 0] - base[0, 0]).abs().max() > 1e-3
    ring.keys = [k.clone().zero_() for k in ring.keys]
    _, no_context, _ = run_block(model, ring, anchor, p)
    assert (no_context[0] - base[0]).abs().max() > 1e-3


def target_taps(model, ids):
    """hc-average of the target layers' outputs over a plain forward of ids: `[1, L, k d]`."""
    taps, handles = {}, []
    for i in model.config.dspark_target_layer_ids:

        def store(module, args, output, i=i):
            taps[i] = output[0].mean(dim=2)

        handles.append(model.model.layers[i].register_forward_hook(store))
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat([taps[i] for i in model.config.dspark_target_layer_ids], dim=-1)


@pytest.mark.parametrize("oracle", [False, True])
def test_generate_ring_equals_full_forward_context(monkeypatch, oracle):
    """After `generate`, the ring of the last draft holds the last `window` committed positions, with the keys of
    a plain forward's taps. `oracle`: drafts are the true greedy tokens for a varying prefix (0..W accepted), so
    rounds commit several positions at once and the ring gets multi-position writes."""
    model = dspark_model()
    ids = torch.randint(2, 96, (1, 200), generator=torch.Generator().manual_seed(5))
    new = 24
    greedy = model.generate(ids, max_new_tokens=new, **KW)
    generators, lengths = [], []
    init, get = DeepseekV4DSparkCandidateGenerator.__init__, DeepseekV4DSparkCandidateGenerator.get_candidates

    def keep_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        generators.append(self)

    def keep_length(self, input_ids, *args, **kwargs):
        if not kwargs.get("is_first_iteration", False):
            lengths.append(input_ids.shape[1])
        return get(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(DeepseekV4DSparkCandidateGenerator, "__init__", keep_init)
    monkeypatch.setattr(DeepseekV4DSparkCandidateGenerator, "get_candidates", keep_length)
    real, schedule, calls = dspark_drafting.draft_block, [2, 0, 4, 1, 3], []  # schedule: right drafts per round

    def recording_block(drafter, embeds, ring, cos, sin, anchor, *args):
        tokens, logits, confidence = real(drafter, embeds, ring, cos, sin, anchor, *args)
        p = int(ring.positions.max())  # the ring was just written up to p; row i drafts position p + 2 + i
        calls.append((p, cos.clone(), sin.clone(), embeds.clone(), int(anchor[0])))
        if oracle:
            right = schedule[len(calls) % len(schedule)]
            for i in range(tokens.shape[1]):
                true = int(greedy[0, p + 2 + i]) if p + 2 + i < greedy.shape[1] else 2
                tokens[0, i] = true if i < right else true % 95 + 1
        return tokens, logits, confidence

    monkeypatch.setattr(dspark_drafting, "draft_block", recording_block)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, use_dspark=True, **KW)
    assert out.tolist() == greedy.tolist()
    assert len(generators) == 1 and len(lengths) >= 2
    stats = model.last_dspark_stats
    assert stats.num_drafted > 0 and (stats.num_accepted > 0 or not oracle)

    # every block: anchor = the token at p + 1, input [anchor, noise...], rope at p + 1 .. p + W (our own angles)
    w, noise = model.config.dspark_block_size, model.config.dspark_noise_token_id
    # the last round may draft nothing (no budget left: k = 0) after writing its ring
    assert [p for p, *_ in calls] == [length - 2 for length in lengths][: len(calls)]
    assert len(calls) >= len(lengths) - 1
    for p, cos, sin, embeds, anchor in calls:
        assert anchor == int(out[0, p + 1])
        block = torch.tensor([anchor] + [noise] * (w - 1))
        torch.testing.assert_close(embeds[0], model.model.embed_tokens.weight[block], atol=0, rtol=0)
        angles = torch.arange(p + 1, p + 1 + w).float()[:, None] * inv_freq_of(model)
        torch.testing.assert_close(cos[0], angles.cos(), atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[0], angles.sin(), atol=1e-6, rtol=0)

    ring, window = generators[0].ring, model.config.sliding_window
    p = lengths[-1] - 2  # the last round's ring write: positions up to p (its anchor is at p + 1)
    kept = torch.arange(p - window + 1, p + 1)
    assert sorted(ring.positions.tolist()) == kept.tolist()
    with torch.no_grad():
        taps = target_taps(model, out[:, : p + 1])
        want = ref_context_keys(model, taps[:, kept], kept)
    for s in range(3):
        torch.testing.assert_close(ring.keys[s][:, kept % window], want[s], atol=ATOL, rtol=0)
