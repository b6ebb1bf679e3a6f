"""Backend parity (design.md, "Tests"): every op x every available backend x its cases and dtypes, forward and
backward, against the reference by the one tolerance table (`tolerances.py`); `torch.library.opcheck` of each
custom op (schema, autograd registration, fake vs real outputs, AOT dispatch) under each backend.

The `clone` backend (harness.py) is registered through the optional-backend loader for this module, so the
harness always covers two backends and proves that a forced backend is the one that runs.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from modeling_deepseek_v4 import ops
from tests.ops.harness import CLONE, CLONE_CALLS, DENSE_OPS, case_ids, clone_backend, make_case, reference_fn
from tests.ops.tolerances import assert_parity

torch.set_num_threads(1)

# Backends registered when the tests are collected (e.g. triton on a GPU machine) plus the clone backend.
BACKENDS = sorted({b for op in DENSE_OPS for b in ops.available_backends(op)} | {CLONE})
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", autouse=True)
def _clone_backend():
    with clone_backend():
        yield


def _id(value) -> str:
    return str(value).replace("torch.", "")


def _tensors(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _names(op: str) -> list[str]:
    return list(inspect.signature(reference_fn(op)).parameters)


def _call(op: str, fn, case, upcast: bool = False, grad_outputs=None):
    """Run `fn` (a public op or the reference function) on fresh leaves of `case`; with `grad_outputs`, also the
    gradients of the inputs named in `case.grad`. `upcast`: every float input in float64 (the truth)."""
    names = _names(op)
    leaves = {}

    def prepare(name, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(torch.float64 if upcast else value.dtype)
            if grad_outputs is not None and name in case.grad:
                leaves[name] = value.requires_grad_(True)
        return value

    args = [prepare(name, value) for name, value in zip(names, case.args)]
    kwargs = {name: prepare(name, value) for name, value in case.kwargs.items()}
    outs = _tensors(fn(*args, **kwargs))
    if grad_outputs is None:
        return outs, ()
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if o.requires_grad]
    grads = torch.autograd.grad(
        [o for o, _ in pairs], [leaves[n] for n in case.grad], [g.to(o.dtype) for o, g in pairs]
    )
    return outs, grads


def _grad_outputs(outs) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs]


def _case_for(op, variant, dtype, backend, device):
    """The case on `device`, or a skip when `backend` does not implement `op` or cannot run these inputs."""
    if backend not in ops.available_backends(op):
        pytest.skip(f"backend {backend!r} does not implement {op}")
    case = make_case(op, variant, dtype, device=device)
    try:
        with ops.use_backend(backend):
            ops.resolve(op, *case.args, **case.kwargs)
    except RuntimeError:
        pytest.skip(f"backend {backend!r} does not support these inputs (device or dtype)")
    return case


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,variant,dtype", case_ids(), ids=_id)
def test_parity(op, variant, dtype, backend, device):
    case = _case_for(op, variant, dtype, backend, device)
    reference = reference_fn(op)
    ref_out, _ = _call(op, reference, case)
    grad_outputs = _grad_outputs(ref_out) if case.grad else None
    ref_out, ref_grads = _call(op, reference, case, grad_outputs=grad_outputs)
    calls = CLONE_CALLS.get(op, 0)
    with ops.use_backend(backend):
        got_out, got_grads = _call(op, getattr(ops, op), case, grad_outputs=grad_outputs)
    if backend == CLONE:
        assert CLONE_CALLS.get(op, 0) == calls + 1  # the forward ran on the forced backend, once
    truth_out, truth_grads = _call(op, reference, case, upcast=True, grad_outputs=grad_outputs)

    assert_parity(op, dtype, "forward", got_out, ref_out, truth_out)
    if case.grad:
        assert_parity(op, dtype, "backward", got_grads, ref_grads, truth_grads)
    if backend == "reference":
        # Through the custom op the reference is itself: forward and gradients bit for bit.
        assert all(torch.equal(a, b) for a, b in zip(got_out, ref_out))
        assert all(torch.equal(a, b) for a, b in zip(got_grads, ref_grads))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,variant,dtype", [c for c in case_ids() if c[2] == torch.float32], ids=_id)
def test_opcheck(op, variant, dtype, backend, device):
    """Schema, autograd registration, fake implementation and AOT dispatch of the custom op, on this backend."""
    case = _case_for(op, variant, dtype, backend, device)

    def leaf(name, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.requires_grad_(name in case.grad)
        return value

    args = [leaf(name, value) for name, value in zip(_names(op), case.args)]
    kwargs = {name: leaf(name, value) for name, value in case.kwargs.items()}
    with ops.use_backend(backend):
        torch.library.opcheck(ops.CUSTOM_OPS[op], args, kwargs)
