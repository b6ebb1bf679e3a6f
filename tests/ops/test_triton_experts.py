"""Triton `grouped_experts` / `quantized_linear` (modeling_deepseek_v4/triton_experts.py) against the reference.

Runs under the interpreter (`TRITON_INTERPRET=1`, 16-row / 16-column / 32-deep blocks) or on CUDA: E = 8 experts of
which three get no token, one expert with several row blocks and a ragged tail, d = 40 and I = 24 (column and
reduction tails), dense banks forward and backward in fp32 and bf16; FP8 (128x128 and 32x32 blocks, gate/up halves
blocked apart) and packed FP4 banks and linears, whose integer bit decoding is checked over every code.
"""

from __future__ import annotations

import pytest
import torch

from modeling_deepseek_v4 import ops, weight_formats
from modeling_deepseek_v4.weight_formats import FP4, FP8, FP8_BLOCK32, PackedWeight
from tests.ops.harness import reference_fn
from tests.ops.tolerances import assert_parity

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(
        "triton" not in ops.available_backends("grouped_experts"), reason="triton backend not available"
    ),
]

torch.set_num_threads(1)

E, T, K, D, INTER = 8, 37, 3, 40, 24
LIMIT = 1.0  # small: both clamps are active
USED = (0, 2, 3, 5, 7)  # experts 1, 4, 6 get no token
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch):
    """Every buffer the kernels fill starts as NaN, so an element they do not write shows up."""
    from modeling_deepseek_v4 import triton_experts

    def empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_experts, "_empty", empty)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(
        (got.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm().clamp_min(1e-30)
    )


def _routing(g: torch.Generator):
    """topk_idx `[T, K]` over USED only, expert 3 preferred (about 2.5 row blocks of 16), and weights `[T, K]`."""
    prob = torch.tensor([1.0, 1.0, 6.0, 1.0, 1.0])
    idx = torch.stack([torch.tensor(USED)[torch.multinomial(prob, K, generator=g)] for _ in range(T)])
    return idx.to(DEVICE), (torch.rand(T, K, generator=g) + 0.1).to(DEVICE)


def _banks(g: torch.Generator):
    gate_up = torch.randn(E, 2 * INTER, D, generator=g) / 4
    down = torch.randn(E, D, INTER, generator=g) / 4
    return gate_up.to(DEVICE), down.to(DEVICE)


def _run(fn, x, gate_up, down, idx, weights, grad_out, names):
    """fn's output and the gradients of the inputs in `names` (fresh leaves)."""
    inputs = {"x": x, "gate_up": gate_up, "down": down, "weights": weights}
    leaves = {
        n: v.detach().clone().requires_grad_(n in names) for n, v in inputs.items() if isinstance(v, torch.Tensor)
    }
    inputs.update(leaves)
    out = fn(inputs["x"], inputs["gate_up"], inputs["down"], idx, inputs["weights"], LIMIT)
    return out, torch.autograd.grad(out, [leaves[n] for n in names], grad_out)


def _triton_experts(*args, **kwargs):
    with ops.use_backend("triton"):
        return ops.grouped_experts(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_experts_forward_backward(dtype):
    g = torch.Generator().manual_seed(0)
    idx, weights = _routing(g)
    counts = torch.bincount(idx.flatten().cpu(), minlength=E)
    assert counts[3] > 32 and counts[3] % 16 and all(counts[e] == 0 for e in (1, 4, 6))
    x = (torch.randn(T, D, generator=g) * 2).to(DEVICE, dtype)
    gate_up, down = (b.to(dtype) for b in _banks(g))
    grad_out = torch.randn(T, D, generator=g).to(DEVICE)
    names = ("x", "gate_up", "down", "weights")
    got, got_grads = _run(_triton_experts, x, gate_up, down, idx, weights, grad_out, names)
    ref, ref_grads = _run(reference_fn("grouped_experts"), x, gate_up, down, idx, weights, grad_out, names)
    assert not got.isnan().any() and not any(gr.isnan().any() for gr in got_grads)
    assert_parity("grouped_experts", dtype, "forward", [got], [ref])
    assert_parity("grouped_experts", dtype, "backward", got_grads, ref_grads)
    for bank_grad in got_grads[1:3]:  # experts without tokens: exactly zero gradient
        assert not bank_grad[[1, 4, 6]].any()


def _packed(w: torch.Tensor, fmt, dtype, halves: int) -> PackedWeight:
    data, scale = fmt.quantize(w, halves=halves)
    return PackedWeight(data, scale, fmt, dtype, halves=halves)


@pytest.mark.parametrize(
    "fmt,dtype",
    [(FP8, torch.float32), (FP8_BLOCK32, torch.bfloat16), (FP4, torch.float32)],
    ids=["fp8-fp32", "fp8_block32-bf16", "fp4-fp32"],
)
def test_quantized_experts(fmt, dtype):
    """PackedWeight banks (gate/up halves blocked apart): forward and the x / topk_weights gradients."""
    g = torch.Generator().manual_seed(1)
    idx, weights = _routing(g)
    x = (torch.randn(T, D, generator=g) * 2).to(DEVICE, dtype)
    gate_up, down = _banks(g)
    gate_up, down = _packed(gate_up, fmt, dtype, 2), _packed(down, fmt, dtype, 1)
    grad_out = torch.randn(T, D, generator=g).to(DEVICE)
    got, got_grads = _run(_triton_experts, x, gate_up, down, idx, weights, grad_out, ("x", "weights"))
    ref, ref_grads = _run(reference_fn("grouped_experts"), x, gate_up, down, idx, weights, grad_out, ("x", "weights"))
    bound = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(got, ref) <= bound
    for got_grad, ref_grad in zip(got_grads, ref_grads):
        assert _rel(got_grad, ref_grad) <= 2 * bound


@pytest.mark.parametrize("fmt", [FP8, FP8_BLOCK32, FP4], ids=["fp8", "fp8_block32", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantized_linear(fmt, dtype):
    g = torch.Generator().manual_seed(2)
    weight = _packed(torch.randn(48, D, generator=g).to(DEVICE), fmt, dtype, 1)
    x = torch.randn(3, 7, D, generator=g).to(DEVICE, dtype)
    grad_out = torch.randn(3, 7, 48, generator=g).to(DEVICE, dtype)
    results = []
    for backend in ("triton", "reference"):
        leaf = x.clone().requires_grad_(True)
        with ops.use_backend(backend):
            y = ops.quantized_linear(leaf, weight)
        results.append((y, *torch.autograd.grad(y, leaf, grad_out)))
    (y, dx), (ref_y, ref_dx) = results
    assert y.dtype == dtype and y.shape == (3, 7, 48) and dx.shape == x.shape
    bound = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(y, ref_y) <= bound and _rel(dx, ref_dx) <= bound


def _every_code_weight(fmt) -> PackedWeight:
    """A weight holding every stored code (E4M3 without its two NaN codes, all FP4 bytes) and varied E8M0 scales."""
    if fmt is FP4:
        data = torch.arange(256, dtype=torch.uint8).view(16, 16).view(torch.int8)  # dense [16, 32]
        scale = (torch.arange(16, dtype=torch.uint8) + 118).view(16, 1).view(torch.float8_e8m0fnu)
    else:
        codes = torch.arange(256, dtype=torch.uint8).view(32, 8)
        codes[(codes & 127) == 127] = 0
        data = codes.view(torch.float8_e4m3fn).repeat(1, 4)  # [32, 32]
        scale = torch.tensor([[115, 140]], dtype=torch.uint8).T.view(torch.float8_e8m0fnu)  # 16 x 32 blocks
        fmt = weight_formats.WeightFormat("fp8_block16x32", torch.float8_e4m3fn, (16, 32))
    return PackedWeight(data.to(DEVICE), scale.to(DEVICE), fmt, torch.float32)


@pytest.mark.parametrize("fmt", [FP8, FP4], ids=["fp8", "fp4"])
def test_decode_every_code_exactly(fmt):
    """x = identity: y = W^T, bit for bit the reference dequantization (integer decoding of each code, scales)."""
    weight = _every_code_weight(fmt)
    n, k = weight.shape
    with ops.use_backend("triton"):
        y = ops.quantized_linear(torch.eye(k, device=DEVICE), weight)
    assert torch.equal(y, weight.dequantize().T)


def test_supports_routes_variants_to_reference():
    g = torch.Generator().manual_seed(3)
    idx, weights = _routing(g)
    x = torch.randn(T, D, generator=g).to(DEVICE)
    gate_up, down = _banks(g)
    triton_supports = ops._REGISTRY["grouped_experts"]["triton"].supports
    assert triton_supports(x, gate_up, down, idx, weights, LIMIT)
    assert not triton_supports(x, gate_up, down, idx, weights, LIMIT, act_quant=True)
    lora = {"lora_a13": torch.zeros(E, 2, D), "lora_b13": torch.zeros(E, 2 * INTER, 2)}
    assert not triton_supports(x, gate_up, down, idx, weights, LIMIT, **lora)
    assert not triton_supports(x.double(), gate_up.double(), down.double(), idx, weights, LIMIT)
    assert not triton_supports(x.bfloat16(), gate_up, down, idx, weights, LIMIT)  # bank dtype differs
    # a view of another kind (a PackedWeight subclass / other format class) goes to the reference
    packed = _packed(gate_up, FP8, torch.float32, 2)
    assert triton_supports(x, packed, down, idx, weights, LIMIT)
    other = type("OtherFormat", (weight_formats.WeightFormat,), {})("fp8", torch.float8_e4m3fn, (128, 128))
    assert not triton_supports(x, PackedWeight(packed.data, packed.scale, other, torch.float32, 2), down, idx,
                               weights, LIMIT)  # fmt: skip
    assert not triton_supports(x, _packed(gate_up, FP8, torch.bfloat16, 2), down, idx, weights, LIMIT)
    linear_supports = ops._REGISTRY["quantized_linear"]["triton"].supports
    w = _packed(torch.randn(48, D, generator=g).to(DEVICE), FP4, torch.float32, 1)
    assert linear_supports(x, w) and not linear_supports(x, w, act_quant=True)
    assert not linear_supports(x, torch.randn(48, D))
    with ops.use_backend("triton"), pytest.raises(RuntimeError):
        ops.grouped_experts(x, gate_up, down, idx, weights, LIMIT, act_quant=True)
