"""The one tolerance table of the ops tests (design.md, "Tests": tolerances by op kind).

Kinds:
- `EXACT`: integer outputs (top-k indices) are equal as sets per row (the op does not promise an order).
- `RELATIVE_RMS`: norms, mHC, dense expert GEMMs: `||got - ref|| / ||ref|| <= bound`, or, when a tensor misses
  that (a sum with cancellation), at most twice the reference's own relative error against float64, plus the bound.
- `REFERENCE_ERROR`: attention and the compressor: `max|got - truth| <= 2 max|ref - truth| + floor`, `truth` being the
  reference in float64 on the same inputs: a backend may be at most twice as wrong as the reference itself in the
  same precision (flash-attention's rule).
Bounds are per dtype, forward and backward (gradients of the inputs for a fixed random output gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXACT, RELATIVE_RMS, REFERENCE_ERROR = "exact", "relative_rms", "reference_error"
FP32, BF16 = torch.float32, torch.bfloat16


@dataclass(frozen=True)
class Tolerance:
    kind: str
    forward: dict[torch.dtype, float]
    backward: dict[torch.dtype, float]


_MHC = Tolerance(RELATIVE_RMS, {FP32: 1e-6, BF16: 1e-2}, {FP32: 1e-5, BF16: 2e-2})

TOLERANCES: dict[str, Tolerance] = {
    "rms_norm": Tolerance(RELATIVE_RMS, {FP32: 1e-6, BF16: 1e-2}, {FP32: 1e-5, BF16: 2e-2}),
    "hc_pre": _MHC,
    "hc_post": _MHC,
    "hc_head": _MHC,
    "compress_pool": Tolerance(REFERENCE_ERROR, {FP32: 1e-6}, {FP32: 1e-6}),
    "indexer_topk": Tolerance(EXACT, {FP32: 0.0, BF16: 0.0}, {}),
    "sparse_attention": Tolerance(REFERENCE_ERROR, {FP32: 1e-6, BF16: 1e-3}, {FP32: 1e-5, BF16: 1e-2}),
    "grouped_experts": Tolerance(RELATIVE_RMS, {FP32: 1e-5, BF16: 1e-2}, {FP32: 1e-5, BF16: 2e-2}),
}


def _sorted_rows(idx: torch.Tensor) -> torch.Tensor:
    big = torch.iinfo(idx.dtype).max
    return torch.where(idx < 0, big, idx).sort(-1).values


def assert_parity(op: str, dtype: torch.dtype, what: str, got, ref, truth=None) -> None:
    """Check the tensors `got` of a backend against the reference's `ref` (and float64 `truth` where the kind
    needs it) by the table: `what` is "forward" or "backward"."""
    tol = TOLERANCES[op]
    bound = getattr(tol, what)[dtype]
    truth = truth if truth is not None else [None] * len(got)
    assert len(got) == len(ref) == len(truth)
    for i, (g, r, t) in enumerate(zip(got, ref, truth)):
        g, r, t = (v.detach() if v is not None else None for v in (g, r, t))
        label = f"{op} {what} #{i} ({dtype})"
        assert g.shape == r.shape and g.dtype == r.dtype, f"{label}: {g.shape} {g.dtype} vs {r.shape} {r.dtype}"
        if tol.kind == EXACT:
            assert torch.equal(_sorted_rows(g), _sorted_rows(r)), label
        elif tol.kind == RELATIVE_RMS:
            err = (g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)
            if err > bound and t is not None:
                # A sum with cancellation (the gradient of a scale over every token) can leave the reference itself
                # that far from float64: then the backend may be at most twice as far from float64 as the reference.
                norm = t.norm().clamp_min(1e-30)
                got_err, ref_err = (g.double() - t).norm() / norm, (r.double() - t).norm() / norm
                assert got_err <= 2 * ref_err + bound, (
                    f"{label}: relative RMS error {float(err):.3g} > {bound}; against float64 "
                    f"{float(got_err):.3g}, reference's {float(ref_err):.3g}"
                )
            else:
                assert err <= bound, f"{label}: relative RMS error {float(err):.3g} > {bound}"
        else:
            got_err = (g.double() - t).abs().max()
            ref_err = (r.double() - t).abs().max()
            assert got_err <= 2 * ref_err + bound, (
                f"{label}: error {float(got_err):.3g}, reference's {float(ref_err):.3g}"
            )
