"""The ops test harness (design.md, "Tests"): input cases of every op, the reference through `ops`, and a trivial
second backend that proves dispatch.

Tests reach the reference only through `ops` (the custom op and the registry), never by importing
``ops_reference``: `reference_op(name)` forces the reference backend around one public call, `reference_fn(name)`
is the plain function registered as the reference (ground truth of the parity test).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from modeling_deepseek_v4 import ops
from modeling_deepseek_v4.ops_backends import OptionalBackend, load_backends

DENSE_OPS = ("rms_norm", "hc_pre", "hc_post", "hc_head", "compress_pool", "indexer_topk", "sparse_attention",
             "grouped_experts")  # fmt: skip
CLONE = "clone"


def reference_op(name: str) -> Callable:
    """`ops.<name>` forced onto the reference backend: the model's call path (custom op, registry, autograd)."""
    public = getattr(ops, name)

    def call(*args, **kwargs):
        with ops.use_backend("reference"):
            return public(*args, **kwargs)

    call.__name__ = name
    return call


def reference_fn(name: str) -> Callable:
    """The function registered as the reference of `name` (plain PyTorch autograd, no custom op)."""
    with ops.use_backend("reference"):
        return ops.resolve(name)


# ------------------------------------------------------------------------------------------ a trivial second backend

CLONE_CALLS: dict[str, int] = {}


def _clone_impl(name: str) -> Callable:
    """The reference run on clones of the inputs (so a call that reached it is counted, and nothing it does can
    touch the caller's tensors)."""

    def copy(value):
        return value.clone() if isinstance(value, torch.Tensor) else value

    def fn(*args, **kwargs):
        CLONE_CALLS[name] = CLONE_CALLS.get(name, 0) + 1
        return reference_fn(name)(*map(copy, args), **{k: copy(v) for k, v in kwargs.items()})

    return fn


def _load_clone_backend() -> None:
    ops.declare_backend(CLONE)
    for name in DENSE_OPS:
        ops.register(name, CLONE, _clone_impl(name))


CLONE_BACKEND = OptionalBackend(CLONE, lambda: True, _load_clone_backend)


@contextlib.contextmanager
def registry_restored() -> Iterator[None]:
    """Put the registry (backends, names, forced stack, fallback log) back as it was after the block."""
    saved = {op: dict(impls) for op, impls in ops._REGISTRY.items()}
    saved_priority, saved_forced, saved_logged = ops.BACKEND_PRIORITY, list(ops._FORCED), set(ops._LOGGED_FALLBACK)
    saved_used = dict(ops._LAST_USED)
    try:
        yield
    finally:
        ops._REGISTRY.clear()
        ops._REGISTRY.update(saved)
        ops.BACKEND_PRIORITY = saved_priority
        ops._FORCED[:] = saved_forced
        ops._LOGGED_FALLBACK.clear()
        ops._LOGGED_FALLBACK.update(saved_logged)
        ops._LAST_USED.clear()
        ops._LAST_USED.update(saved_used)


@contextlib.contextmanager
def clone_backend() -> Iterator[None]:
    """The clone backend registered through the optional-backend loader, for the duration of the block."""
    with registry_restored():
        assert load_backends([CLONE_BACKEND]) == [CLONE]
        yield


# ------------------------------------------------------------------------------------------------------- input cases


@dataclass
class Case:
    """One call of an op: `args` / `kwargs` as the model passes them; `grad` names the inputs differentiated."""

    id: str
    args: tuple
    kwargs: dict
    grad: tuple[str, ...]


def _randn(g: torch.Generator, *shape: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _rms_norm(variant: str, dtype, g):
    if variant == "weighted":
        return Case(
            variant, (_randn(g, 3, 32, dtype=dtype, scale=3), _randn(g, 32, dtype=dtype), 1e-6), {}, ("x", "weight")
        )
    return Case(variant, (_randn(g, 2, 5, 4, 16, dtype=dtype), None, 1e-6), {}, ("x",))


def _hc_inputs(g, n: int, d: int, rows: int, mixes: int, dtype):
    x = _randn(g, 2, 3, n, d, dtype=dtype)
    fn = _randn(g, mixes, n * d, scale=1 / math.sqrt(n * d))
    return x, fn, _randn(g, mixes), torch.rand(rows, generator=g) + 0.5


def _hc_pre(variant: str, dtype, g):
    n, d, iters = (4, 8, 20) if variant == "n4" else (2, 16, 3)
    x, fn, base, scale = _hc_inputs(g, n, d, 3, (2 + n) * n, dtype)
    return Case(variant, (x, fn, base, scale, iters, 1e-6, 1e-6), {}, ("x", "fn", "base", "scale"))


def _hc_post(variant: str, dtype, g):
    n, d = (4, 8) if variant == "n4" else (2, 16)
    f, x = _randn(g, 2, 3, d, dtype=dtype), _randn(g, 2, 3, n, d, dtype=dtype)
    post, comb = 2 * torch.rand(2, 3, n, generator=g), torch.rand(2, 3, n, n, generator=g)
    return Case(variant, (f, x, post, comb), {}, ("f", "x", "post", "comb"))


def _hc_head(variant: str, dtype, g):
    n, d = (4, 8) if variant == "n4" else (2, 16)
    x, fn, base, scale = _hc_inputs(g, n, d, 1, n, dtype)
    return Case(variant, (x, fn, base, scale, 1e-6, 1e-6), {}, ("x", "fn", "base", "scale"))


def _compress_pool(variant: str, dtype, g):
    # The compressor pools in fp32 whatever the model dtype (its projections are upcast first).
    ratio, d = 4, 6
    if variant == "hca":
        kv, score = _randn(g, 2, 3 * ratio, d), _randn(g, 2, 3 * ratio, d, scale=2)
        return Case(variant, (kv, score, ratio), {}, ("kv", "score"))
    kv, score = _randn(g, 2, 3 * ratio, 2 * d), _randn(g, 2, 3 * ratio, 2 * d, scale=2)
    overlap_kv, overlap_score = _randn(g, 2, ratio, d), _randn(g, 2, ratio, d)
    overlap_score[0] = float("-inf")  # row 0 has no window before window 0
    return Case(
        variant, (kv, score, ratio, overlap_kv, overlap_score), {}, ("kv", "score", "overlap_kv", "overlap_score")
    )


def _indexer_topk(variant: str, dtype, g):
    b, s, h, c, n = 2, 12, 4, 8, 9
    q, keys = _randn(g, b, s, h, c, dtype=dtype), _randn(g, b, n, c, dtype=dtype)
    weights = torch.rand(b, s, h, generator=g)
    positions = torch.tensor([0, 7])[:, None] + torch.arange(s)
    kwargs = {"static_shapes": variant == "static", "round_scores": variant == "rounded"}
    return Case(variant, (q, keys, weights, positions, 2, 3), dict(kwargs, chunk=5), ())


def _sparse_attention(variant: str, dtype, g):
    b, s, h, d, window, ratio, n_comp, topk = 3, 6, 2, 8, 4, 2, 6, 3
    q = _randn(g, b, s, h, d, dtype=dtype)
    window_kv = _randn(g, b, window - 1 + s, d, dtype=dtype)
    start = torch.tensor([0, 2, 9])
    sinks = _randn(g, h, dtype=dtype)
    args = (q, window_kv, start, window, sinks, 0.35)
    if variant == "window":
        return Case(variant, args, {"chunk": 4}, ("q", "window_kv", "sinks"))
    comp = _randn(g, b, n_comp, d, dtype=dtype)
    idx = None
    if variant == "csa":
        idx = torch.stack([torch.randperm(n_comp, generator=g)[:topk] for _ in range(b * s)]).view(b, s, topk)
        idx = idx.masked_fill(torch.rand(b, s, topk, generator=g) < 0.3, -1)
    kwargs = {
        "compressed_kv": comp,
        "ratio": ratio,
        "topk_idx": idx,
        "chunk": 4,
        "static_shapes": variant == "hca_static",
    }
    return Case(variant, args, kwargs, ("q", "window_kv", "sinks", "compressed_kv"))


def _grouped_experts(variant: str, dtype, g):
    t, d, inter, e, k = 7, 6, 5, 5, 2
    x = _randn(g, t, d, dtype=dtype)
    gate_up, down = _randn(g, e, 2 * inter, d, dtype=dtype), _randn(g, e, d, inter, dtype=dtype, scale=0.5)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g) + 0.1
    args = (x, gate_up, down, idx, weights, 1.0)
    kwargs, grad = {"static_shapes": variant.startswith("static")}, ("x", "gate_up_proj", "down_proj", "topk_weights")
    if variant.endswith("lora"):  # grouped expert LoRA: per-expert gate/up factors, shared down factors
        r = 3
        kwargs.update(
            lora_a13=_randn(g, e, r, d), lora_b13=_randn(g, e, 2 * inter, r), lora_a2=_randn(g, 1, r, inter),
            lora_b2=_randn(g, 1, d, r),
        )  # fmt: skip
        grad += ("lora_a13", "lora_b13", "lora_a2", "lora_b2")
    return Case(variant, args, kwargs, grad)


# op -> (builder, variants, dtypes it supports)
CASES: dict[str, tuple[Callable, tuple[str, ...], tuple[torch.dtype, ...]]] = {
    "rms_norm": (_rms_norm, ("weighted", "unweighted"), (torch.float32, torch.bfloat16)),
    "hc_pre": (_hc_pre, ("n4", "n2"), (torch.float32, torch.bfloat16)),
    "hc_post": (_hc_post, ("n4", "n2"), (torch.float32, torch.bfloat16)),
    "hc_head": (_hc_head, ("n4", "n2"), (torch.float32, torch.bfloat16)),
    "compress_pool": (_compress_pool, ("hca", "csa"), (torch.float32,)),
    "indexer_topk": (_indexer_topk, ("dynamic", "static", "rounded"), (torch.float32, torch.bfloat16)),
    "sparse_attention": (_sparse_attention, ("window", "hca", "hca_static", "csa"), (torch.float32, torch.bfloat16)),
    "grouped_experts": (
        _grouped_experts,
        ("dynamic", "static", "dynamic_lora", "static_lora"),
        (torch.float32, torch.bfloat16),
    ),
}


def make_case(op: str, variant: str, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> Case:
    """The inputs of `op` for `variant` in `dtype` on `device` (float inputs the model keeps in fp32 stay fp32)."""
    case = CASES[op][0](variant, dtype, torch.Generator().manual_seed(seed))

    def move(value):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    return Case(case.id, tuple(map(move, case.args)), {k: move(v) for k, v in case.kwargs.items()}, case.grad)


def case_ids() -> list[tuple[str, str, torch.dtype]]:
    return [
        (op, variant, dtype) for op, (_, variants, dtypes) in CASES.items() for variant in variants for dtype in dtypes
    ]
