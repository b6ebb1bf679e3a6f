"""Public op functions and the backend registry (design.md, "Backend dispatch").

Model code calls one public function per op (`rms_norm`, `hc_pre`, `hc_post`, `hc_head`, `compress_pool`,
`indexer_topk`, `sparse_attention`, `grouped_experts`, `quantized_linear`). Each op has implementations registered
per backend; the `reference` backend (``ops_reference.py``) runs everywhere and is the specification, optional
backends (fused kernels in ``triton_*.py``, added by later work) are imported by ``ops_backends.py`` when their
requirements hold and register here with a `supports(*args)` predicate checked per call, so a model can move
between devices.

The dense ops are also `torch.library` custom ops (``ops_custom.py``): under `torch.compile` the public function
calls the custom op, whose implementation picks the backend at run time (below), so the compiled graph has one node
per op and the choice still follows `use_backend`; eager calls go straight to the backend (plain autograd).
`quantized_linear`, and `grouped_experts` over weight views (`PackedWeight` and friends) rather than tensors, stay
plain Python dispatch through the same registry.

Selection order:
1. a forced backend, from the ``use_backend(...)`` context manager or the ``DSV4_OPS_BACKEND`` environment
   variable; forcing a backend that cannot run the call raises;
2. the config field ``ops_backend`` (passed by the modules as ``backend=``) when it is not ``"auto"``;
3. auto: the first registered backend, in priority order, whose ``supports`` accepts the call; the first time an
   op falls back from a preferred backend an info line is logged.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .ops_backends import load_backends
from .ops_custom import define_custom_ops
from .ops_reference import (
    compress_pool as _compress_pool,
)
from .ops_reference import (
    grouped_experts as _grouped_experts,
)
from .ops_reference import (
    hc_head as _hc_head,
)
from .ops_reference import (
    hc_post as _hc_post,
)
from .ops_reference import (
    hc_pre as _hc_pre,
)
from .ops_reference import (
    indexer_topk as _indexer_topk,
)
from .ops_reference import (
    quantized_linear as _quantized_linear,
)
from .ops_reference import (
    rms_norm as _rms_norm,
)
from .ops_reference import (
    sparse_attention as _sparse_attention,
)

logger = logging.getLogger(__name__)

BACKEND_ENV_VAR = "DSV4_OPS_BACKEND"
# Higher priority first; "reference" is always last and always supports the call. `declare_backend` adds names.
BACKEND_PRIORITY: tuple[str, ...] = ("triton", "reference")


@dataclass
class _Impl:
    fn: Callable
    supports: Callable[..., bool]


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_FORCED: list[str] = []
_LOGGED_FALLBACK: set[tuple[str, str]] = set()
# op -> the backend that ran its latest eager call (`backends_in_use`); a compiled graph resolves inside its custom op.
_LAST_USED: dict[str, str] = {}


def _always(*args, **kwargs) -> bool:
    return True


def register(op: str, backend: str, fn: Callable, supports: Callable[..., bool] = _always) -> None:
    """Register `fn` as the `backend` implementation of `op` (idempotent: re-registering replaces).

    `fn` has the signature of the reference function; the dense ops call it (and `supports`) with the arguments that
    have no default positionally and the others by keyword, e.g. `fn(q, keys, weights, positions, ratio, topk,
    chunk=256, head_group=8, static_shapes=False, round_scores=False)`.
    """
    if backend not in BACKEND_PRIORITY:
        raise ValueError(f"Unknown backend {backend!r} for op {op!r}; allowed: {BACKEND_PRIORITY}.")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, supports)


def declare_backend(name: str) -> None:
    """Allow `name` as a backend, ranked below the backends known so far and above `reference` (idempotent)."""
    global BACKEND_PRIORITY
    if not name.isidentifier() or name != name.lower() or name == "auto":
        raise ValueError(f"Backend names are lower-case identifiers other than 'auto', got {name!r}.")
    if name not in BACKEND_PRIORITY:
        BACKEND_PRIORITY = (*BACKEND_PRIORITY[:-1], name, BACKEND_PRIORITY[-1])


def backends_in_use() -> dict[str, dict[str, object]]:
    """What runs where, to print or log: per op, the backends registered (priority order) and the one that ran its
    latest call (None before the first), e.g. `{"sparse_attention": {"registered": ["triton", "reference"],
    "last_used": "triton"}, ...}`."""
    return {op: {"registered": available_backends(op), "last_used": _LAST_USED.get(op)} for op in _REGISTRY}


def available_backends(op: str) -> list[str]:
    """Backends registered for `op`, in priority order."""
    impls = _REGISTRY.get(op, {})
    return [b for b in BACKEND_PRIORITY if b in impls]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every op inside the block onto backend `name` (e.g. "reference", "triton"); raises if it cannot run."""
    if name not in BACKEND_PRIORITY:
        raise ValueError(f"Unknown ops backend {name!r}; allowed: {BACKEND_PRIORITY}.")
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def _forced_backend() -> str | None:
    if _FORCED:
        return _FORCED[-1]
    env = os.environ.get(BACKEND_ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKEND_PRIORITY:
        raise ValueError(
            f"{BACKEND_ENV_VAR}={env!r} is not a known ops backend; use one of {BACKEND_PRIORITY} or auto."
        )
    return env


def resolve(op: str, *args, backend: str | None = None, **kwargs) -> Callable:
    """Return the implementation of `op` that will run this call (see module docstring for the order)."""
    impls = _REGISTRY[op]
    forced = _forced_backend() or (backend if backend not in (None, "auto") else None)
    if forced is not None:
        impl = impls.get(forced)
        if impl is None or not impl.supports(*args, **kwargs):
            raise RuntimeError(
                f"Ops backend {forced!r} was requested for {op!r} but cannot run this call "
                f"(registered: {available_backends(op)}). For `triton`, install the `triton` extra and use CUDA "
                f"tensors; or select the reference backend."
            )
        _LAST_USED[op] = forced
        return impl.fn
    for name in BACKEND_PRIORITY:
        impl = impls.get(name)
        if impl is not None and impl.supports(*args, **kwargs):
            if name != BACKEND_PRIORITY[0] and (op, name) not in _LOGGED_FALLBACK and len(impls) > 1:
                _LOGGED_FALLBACK.add((op, name))
                logger.info("DeepSeek-V4 op %s runs on the %s backend for these inputs.", op, name)
            _LAST_USED[op] = name
            return impl.fn
    raise RuntimeError(f"No backend can run op {op!r}.")


def _run(op: str, args: tuple, kwargs: dict, backend: str):
    """Run one call of `op` on the backend the registry picks (the implementation of every custom op)."""
    return resolve(op, *args, backend=backend, **kwargs)(*args, **kwargs)


def _dispatch(op: str):
    """Plain Python dispatch (no custom op): `quantized_linear`, and `grouped_experts` over weight views."""

    def call(*args, backend: str | None = None, **kwargs):
        return resolve(op, *args, backend=backend, **kwargs)(*args, **kwargs)

    call.__name__ = op
    call.__doc__ = _REFERENCE[op].__doc__
    return call


def _public(op: str):
    """The public function of a dense op. Under `torch.compile` it is the op's custom op (one opaque node, the backend
    picked at run time); eager calls dispatch directly, so autograd differentiates the backend itself: no recompute
    in backward (the custom op's backward re-runs the reference), double backward works, and tensor subclasses
    (DTensor) decompose as before."""
    custom, params = CUSTOM_OPS[op], inspect.signature(_REFERENCE[op]).parameters.values()
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    optional, n = list(defaults), len(required)

    def call(*args, backend: str | None = None, **kwargs):
        if torch.compiler.is_compiling():
            return custom(*args, **kwargs, backend=backend or "auto")
        # Backends get one calling convention either way: required arguments by position, the others by name
        # (defaults filled in). Precomputed from the signature: this runs on every eager op call.
        if len(args) > n:
            kwargs = {**dict(zip(optional, args[n:])), **kwargs}
            args = args[:n]
        elif len(args) < n:
            args = (*args, *(kwargs.pop(name) for name in required[len(args) :]))
        return _run(op, args, {**defaults, **kwargs}, backend)

    call.__name__ = op
    call.__doc__ = _REFERENCE[op].__doc__
    return call


# `from .x import y` only: the Hub copy of this folder follows exactly that import form.
_REFERENCE = {
    "rms_norm": _rms_norm,
    "hc_pre": _hc_pre,
    "hc_post": _hc_post,
    "hc_head": _hc_head,
    "compress_pool": _compress_pool,
    "indexer_topk": _indexer_topk,
    "sparse_attention": _sparse_attention,
    "grouped_experts": _grouped_experts,
    "quantized_linear": _quantized_linear,
}
for _op, _fn in _REFERENCE.items():
    register(_op, "reference", _fn)

# One custom op per dense op (ops_custom.py); `quantized_linear` stays plain dispatch.
CUSTOM_OPS = define_custom_ops(_run, _REFERENCE)

rms_norm = _public("rms_norm")
hc_pre = _public("hc_pre")
hc_post = _public("hc_post")
hc_head = _public("hc_head")
compress_pool = _public("compress_pool")
indexer_topk = _public("indexer_topk")
sparse_attention = _public("sparse_attention")
quantized_linear = _dispatch("quantized_linear")
_grouped_experts_custom = _public("grouped_experts")
_grouped_experts_views = _dispatch("grouped_experts")


def grouped_experts(x, gate_up_proj, down_proj, *args, backend: str | None = None, **kwargs):
    """Routed experts: the custom op when both banks are tensors; weight views (`PackedWeight` of any format, QAT
    banks, which dequantize what is indexed) keep plain dispatch. See ``ops_reference.grouped_experts``."""
    if isinstance(gate_up_proj, torch.Tensor) and isinstance(down_proj, torch.Tensor):
        return _grouped_experts_custom(x, gate_up_proj, down_proj, *args, backend=backend, **kwargs)
    return _grouped_experts_views(x, gate_up_proj, down_proj, *args, backend=backend, **kwargs)


# Optional backends (Triton kernels, ...) register themselves when their requirements hold (ops_backends.py).
load_backends()
