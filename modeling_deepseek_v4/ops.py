"""Public op functions and the backend registry.

Model code calls one public function per op (`rms_norm`, `hc_pre`, `hc_post`, `hc_head`, `compress_pool`,
`indexer_topk`, `sparse_attention`, `grouped_experts`, `quantized_linear`). Each op has implementations registered
per backend; the
`reference` backend (``ops_reference.py``) runs everywhere and is the specification, fused kernels (``triton_*.py``,
added by later work) register themselves here with a `supports(*args)` predicate checked per call, so a model can
move between devices.

Selection order (design.md, "Backend dispatch"):
1. a forced backend, from the ``use_backend(...)`` context manager or the ``DSV4_OPS_BACKEND`` environment
   variable; forcing a backend that cannot run the call raises;
2. the config field ``ops_backend`` (passed by the modules as ``backend=``) when it is not ``"auto"``;
3. auto: the first registered backend, in priority order, whose ``supports`` accepts the call; the first time an
   op falls back from a preferred backend an info line is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
# Higher priority first; "reference" is always last and always supports the call.
BACKEND_PRIORITY = ("triton", "reference")


@dataclass
class _Impl:
    fn: Callable
    supports: Callable[..., bool]


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_FORCED: list[str] = []
_LOGGED_FALLBACK: set[tuple[str, str]] = set()


def _always(*args, **kwargs) -> bool:
    return True


def register(op: str, backend: str, fn: Callable, supports: Callable[..., bool] = _always) -> None:
    """Register `fn` as the `backend` implementation of `op` (idempotent: re-registering replaces)."""
    if backend not in BACKEND_PRIORITY:
        raise ValueError(f"Unknown backend {backend!r} for op {op!r}; allowed: {BACKEND_PRIORITY}.")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, supports)


def available_backends(op: str) -> list[str]:
    """Backends registered for `op`, in priority order."""
    impls = _REGISTRY.get(op, {})
    return [b for b in BACKEND_PRIORITY if b in impls]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every op inside the block onto backend `name` ("reference" or "triton"); raises if it cannot run."""
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
                f"(registered: {available_backends(op)}). Install the `triton` extra and use CUDA tensors, "
                f"or select the reference backend."
            )
        return impl.fn
    for name in BACKEND_PRIORITY:
        impl = impls.get(name)
        if impl is not None and impl.supports(*args, **kwargs):
            if name != BACKEND_PRIORITY[0] and (op, name) not in _LOGGED_FALLBACK and len(impls) > 1:
                _LOGGED_FALLBACK.add((op, name))
                logger.info("DeepSeek-V4 op %s runs on the %s backend for these inputs.", op, name)
            return impl.fn
    raise RuntimeError(f"No backend can run op {op!r}.")


def _dispatch(op: str):
    def call(*args, backend: str | None = None, **kwargs):
        return resolve(op, *args, backend=backend, **kwargs)(*args, **kwargs)

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

rms_norm = _dispatch("rms_norm")
hc_pre = _dispatch("hc_pre")
hc_post = _dispatch("hc_post")
hc_head = _dispatch("hc_head")
compress_pool = _dispatch("compress_pool")
indexer_topk = _dispatch("indexer_topk")
sparse_attention = _dispatch("sparse_attention")
grouped_experts = _dispatch("grouped_experts")
quantized_linear = _dispatch("quantized_linear")
