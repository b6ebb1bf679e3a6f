"""Reference numerics mode (forward-math.md §9 R1-R4): off by default, each step applied where the official forward
applies it, streaming-consistent, and the same on quantized and dequantized weights."""

import copy

import pytest
import torch

from modeling_deepseek_v4 import attention, compressor
from modeling_deepseek_v4.quant_formats import fp4_act_roundtrip, fp8_act_roundtrip
from modeling_deepseek_v4.quantization import dequantize_model, quantize_model, set_reference_numerics
from modeling_deepseek_v4.reference_numerics import hadamard_transform, indexer_fp4_roundtrip, kv_fp8_roundtrip
from tests.conftest import tiny_model
from tests.models.test_cache_consistency import incremental_logits
from tests.ops.harness import reference_fn


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_hadamard_is_the_normalized_sylvester_matrix_and_self_inverse():
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(hadamard_transform(x), x @ sylvester(128).T / 128**0.5, atol=1e-5, rtol=0)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_transform(torch.randn(4, 96))


def test_roundtrip_helpers():
    kv = torch.randn(2, 7, 32) * 3
    out = kv_fp8_roundtrip(kv, rope_dim=8)
    assert torch.equal(out[..., 24:], kv[..., 24:])  # RoPE dims untouched
    assert torch.equal(out[..., :24], fp8_act_roundtrip(kv[..., :24], 64))
    q = torch.randn(2, 3, 4, 16)
    assert torch.equal(indexer_fp4_roundtrip(q), fp4_act_roundtrip(hadamard_transform(q)))
    # on the grid already: a second round trip changes nothing
    assert torch.equal(fp8_act_roundtrip(out[..., :24], 64), out[..., :24])


def test_off_by_default_and_switchable():
    model = tiny_model()
    assert model.config.reference_numerics is False
    ids = torch.randint(0, 97, (2, 33))
    base = logits(model, ids)
    set_reference_numerics(model, True)
    on = logits(model, ids)
    assert not torch.equal(on, base)
    # a simulation of quantization noise, not a different model
    assert (on - base).abs().mean() < 0.1 * base.abs().mean()
    set_reference_numerics(model, False)
    assert torch.equal(logits(model, ids), base)
    # from the config at construction, same result as switching on
    cfg = copy.deepcopy(model.config)
    cfg.reference_numerics = True
    fresh = type(model)(cfg).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(logits(fresh, ids), on)


def test_each_step_runs_where_the_reference_runs_it(monkeypatch):
    calls = {"r2_window": 0, "r2_entries": 0, "r3": 0}

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(attention, "kv_fp8_roundtrip", counting("r2_window", kv_fp8_roundtrip))
    monkeypatch.setattr(compressor, "kv_fp8_roundtrip", counting("r2_entries", kv_fp8_roundtrip))
    monkeypatch.setattr(compressor, "indexer_fp4_roundtrip", counting("r3", indexer_fp4_roundtrip))
    rounded = []

    def spy_topk(*args, **kwargs):
        rounded.append(kwargs["round_scores"])
        return reference_fn("indexer_topk")(*args, **{k: v for k, v in kwargs.items() if k != "backend"})

    monkeypatch.setattr(compressor, "indexer_topk", spy_topk)

    model = tiny_model()
    cfg = model.config
    ids = torch.randint(0, 97, (1, 40))
    logits(model, ids)
    assert sum(calls.values()) == 0 and not any(rounded)  # off: nothing runs

    set_reference_numerics(model, True)
    hooked = [n for n, m in model.named_modules() if "_dsv4_r1_hook" in m.__dict__]
    blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    csa = sum(r == 4 for r in cfg.compress_ratios)
    assert len(hooked) == blocks * (4 + 3) + csa + 2  # q_a, q_b, kv, o_b, shared x3, indexer q_b, MTP e/h
    assert not any(n.endswith("o_a_proj") or "compressor.kv_proj" in n or "weights_proj" in n for n in hooked)
    assert all(m.reference_numerics for n, m in model.named_modules() if n.endswith("mlp.experts"))
    indexers = [m for n, m in model.named_modules() if n.endswith("compressor.indexer")]
    assert indexers and all(m.reference_numerics for m in indexers)
    logits(model, ids)
    main_layers = cfg.num_hidden_layers  # `logits` runs the main model only
    assert calls["r2_window"] == main_layers
    compressed = sum(r != 0 for r in cfg.compress_ratios[:main_layers])
    csa_main = sum(r == 4 for r in cfg.compress_ratios[:main_layers])
    assert calls["r2_entries"] == compressed
    assert calls["r3"] == 2 * csa_main  # indexer keys and queries
    assert rounded[-csa_main:] == [True] * csa_main  # R4


def test_quantized_and_dequantized_agree_in_reference_numerics():
    model = quantize_model(tiny_model("pro"), weights="fp8", experts="fp4")
    set_reference_numerics(model, True)
    dense = dequantize_model(copy.deepcopy(model), torch.float32)
    assert "_dsv4_r1_hook" in dense.model.layers[1].self_attn.q_a_proj.__dict__  # re-hooked after the swap
    ids = torch.randint(0, 97, (2, 30))
    assert torch.equal(logits(model, ids), logits(dense, ids))


def test_streaming_in_reference_numerics_matches_full_forward():
    model = set_reference_numerics(tiny_model("pro"), True)
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        inc = incremental_logits(model, ids, [20] + [1] * 28)
    # every R step is per token / per entry, so streaming sees the same values; a summation-order difference can
    # flip one FP8 rounding, hence a tolerance well above fp32 noise but far below the R-mode effect itself
    diff = (inc - full).abs()
    assert diff.median() < 1e-5 and diff.max() < 5e-2


def test_expert_activation_quantization_matches_a_hand_written_expert():
    torch.manual_seed(0)
    x, gate_up, down = torch.randn(5, 64), torch.randn(3, 16, 64) * 0.1, torch.randn(3, 64, 8) * 0.1
    idx, w = torch.randint(0, 3, (5, 1)), torch.rand(5, 1)
    out = reference_fn("grouped_experts")(x, gate_up, down, idx, w, 10.0, act_quant=True)
    for t in range(5):
        e = int(idx[t, 0])
        h = fp8_act_roundtrip(x[t]) @ gate_up[e].T
        gate, up = h[:8].clamp(max=10.0), h[8:].clamp(-10.0, 10.0)
        h = fp8_act_roundtrip(torch.nn.functional.silu(gate) * up * w[t])
        torch.testing.assert_close(out[t], h @ down[e].T, atol=1e-5, rtol=0)
    assert not torch.equal(out, reference_fn("grouped_experts")(x, gate_up, down, idx, w, 10.0))
