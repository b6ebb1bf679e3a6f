"""Loader of the optional ops backends (design.md, "Backend dispatch").

An optional backend is a sibling module (e.g. ``triton_sparse_attention.py``, added by later work) with a
`register_backend()` that calls ``ops.register(op, "triton", fn, supports)`` for the ops it implements. Each is listed
in `OPTIONAL_BACKENDS` with its requirement and a loader doing ``from .triton_x import register_backend`` inside the
function: that import form is what `save_pretrained` copies to the Hub (hf-integration.md §5), and inside a function it
runs only when the requirement holds, so the package and its Hub copy import on machines without Triton or CUDA.
A backend whose import or registration fails is logged and skipped: the reference backend still runs everything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptionalBackend:
    """`load()` imports and registers backend `name` for some ops; it is called only when `requirement()` holds."""

    name: str
    requirement: Callable[[], bool]
    load: Callable[[], None]


def triton_usable() -> bool:
    """Triton is importable and kernels can run: a CUDA device, or Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# One entry per kernel file; the import sits inside the loader (the form `save_pretrained` copies to the Hub), so it
# runs only when Triton is usable. Each file's `register_backend()` registers its ops under "triton".
def _load_triton_norm_mhc() -> None:
    from .triton_norm_mhc import register_backend

    register_backend()


def _load_triton_compressor() -> None:
    from .triton_compressor import register_backend

    register_backend()


def _load_triton_indexer() -> None:
    from .triton_indexer import register_backend

    register_backend()


def _load_triton_sparse_attention() -> None:
    from .triton_sparse_attention import register_backend

    register_backend()


def _load_triton_experts() -> None:
    from .triton_experts import register_backend

    register_backend()


OPTIONAL_BACKENDS: tuple[OptionalBackend, ...] = tuple(
    OptionalBackend("triton", triton_usable, load)
    for load in (
        _load_triton_norm_mhc,
        _load_triton_compressor,
        _load_triton_indexer,
        _load_triton_sparse_attention,
        _load_triton_experts,
    )
)


def load_backends(backends: Iterable[OptionalBackend] | None = None) -> list[str]:
    """Load every backend of `backends` (default `OPTIONAL_BACKENDS`) whose requirement holds; returns the names
    loaded. Called once when ``ops.py`` is imported; loading again re-registers (registration is idempotent)."""
    loaded = []
    for backend in OPTIONAL_BACKENDS if backends is None else backends:
        if not backend.requirement():
            continue
        try:
            backend.load()
        # Whatever goes wrong in an optional backend, the reference stays in charge.
        except Exception as err:
            logger.warning("DeepSeek-V4 ops backend %r was not loaded: %s", backend.name, err)
            continue
        loaded.append(backend.name)
    return loaded
