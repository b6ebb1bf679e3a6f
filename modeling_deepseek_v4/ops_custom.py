"""The dense ops as `torch.library` custom ops (design.md, "Backend dispatch").

Each op of `SPECS` becomes one custom op `dsv4::<op>` whose schema is the reference signature plus
`backend: str = "auto"` (the config value). Its implementation asks the registry (``ops.py``) which backend runs the
call, at run time, so `use_backend`, `DSV4_OPS_BACKEND` and the per-call `supports` checks also hold inside a
compiled graph. Its fake implementation derives the outputs' shapes and dtypes from the inputs' alone, so
`torch.compile` records the op as one graph node and never traces the reference (which reads tensor values: causal
limits, expert counts). Outputs are contiguous (the fakes say so; the implementation makes it true).

Autograd: the forward saves its inputs; the backward is a second custom op `dsv4::<op>_backward` that recomputes the
reference with autograd (under the forward's autocast state) and differentiates it, so gradients are the reference's
whichever backend ran the forward, and a compiled training step keeps the backward as one node too. Only the inputs
are saved (like activation checkpointing of each op), at the cost of one more reference forward per op in training.

A second copy of this module in the process (the Hub copy next to the pip package) defines its ops under
`dsv4_1`, `dsv4_2`, ...: each copy dispatches to its own registry.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


def _acc(*dtypes: torch.dtype) -> torch.dtype:
    """The reference's accumulation dtype for these inputs: fp32, or fp64 when one of them is fp64."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape)


def _hc_pre_fake(x, fn, base, scale, sinkhorn_iters, hc_eps, norm_eps):
    *lead, n, d = x.shape
    mix = _acc(x.dtype, base.dtype)
    return x.new_empty((*lead, d)), x.new_empty((*lead, n), dtype=mix), x.new_empty((*lead, n, n), dtype=mix)


def _hc_post_fake(f, x, post, comb):
    return x.new_empty(x.shape)


def _hc_head_fake(x, fn, base, scale, hc_eps, norm_eps):
    return x.new_empty((*x.shape[:-2], x.shape[-1]))


def _compress_pool_fake(kv, score, ratio, overlap_kv=None, overlap_score=None):
    b, length, width = kv.shape
    dtype = torch.promote_types(kv.dtype, score.dtype)
    if overlap_kv is not None:
        width = width // 2
        dtype = torch.promote_types(dtype, torch.promote_types(overlap_kv.dtype, overlap_score.dtype))
    return kv.new_empty((b, length // ratio, width), dtype=dtype)


def _indexer_topk_fake(q, keys, weights, positions, ratio, topk, chunk=256, head_group=8, static_shapes=False,
                       round_scores=False):  # fmt: skip
    # The output width depends on shapes only: min(k, N) (never on how many entries are causal).
    return q.new_empty((q.shape[0], q.shape[1], torch.sym_min(topk, keys.shape[1])), dtype=torch.long)


def _sparse_attention_fake(q, window_kv, start, window, sinks, scale, compressed_kv=None, ratio=0, topk_idx=None,
                           chunk=256, static_shapes=False):  # fmt: skip
    return q.new_empty(q.shape)


def _grouped_experts_fake(x, gate_up_proj, down_proj, topk_idx, topk_weights, swiglu_limit, static_shapes=False,
                          act_quant=False, lora_a13=None, lora_b13=None, lora_a2=None, lora_b2=None):  # fmt: skip
    return x.new_empty(x.shape, dtype=_acc(x.dtype))


@dataclass(frozen=True)
class OpSpec:
    """Schema of an op's arguments (names and defaults as in ``ops_reference.py``), its returns and fake."""

    args: str
    returns: str
    fake: Callable
    differentiable: bool = True


SPECS = {
    "rms_norm": OpSpec("Tensor x, Tensor? weight, float eps", "Tensor", _rms_norm_fake),
    "hc_pre": OpSpec(
        "Tensor x, Tensor fn, Tensor base, Tensor scale, int sinkhorn_iters, float hc_eps, float norm_eps",
        "(Tensor, Tensor, Tensor)",
        _hc_pre_fake,
    ),
    "hc_post": OpSpec("Tensor f, Tensor x, Tensor post, Tensor comb", "Tensor", _hc_post_fake),
    "hc_head": OpSpec(
        "Tensor x, Tensor fn, Tensor base, Tensor scale, float hc_eps, float norm_eps", "Tensor", _hc_head_fake
    ),
    "compress_pool": OpSpec(
        "Tensor kv, Tensor score, int ratio, Tensor? overlap_kv=None, Tensor? overlap_score=None",
        "Tensor",
        _compress_pool_fake,
    ),
    "indexer_topk": OpSpec(
        "Tensor q, Tensor keys, Tensor weights, Tensor positions, int ratio, int topk, int chunk=256, "
        "int head_group=8, bool static_shapes=False, bool round_scores=False",
        "Tensor",
        _indexer_topk_fake,
        differentiable=False,
    ),
    "sparse_attention": OpSpec(
        "Tensor q, Tensor window_kv, Tensor start, int window, Tensor sinks, float scale, Tensor? compressed_kv=None, "
        "int ratio=0, Tensor? topk_idx=None, int chunk=256, bool static_shapes=False",
        "Tensor",
        _sparse_attention_fake,
    ),
    "grouped_experts": OpSpec(
        "Tensor x, Tensor gate_up_proj, Tensor down_proj, Tensor topk_idx, Tensor topk_weights, float swiglu_limit, "
        "bool static_shapes=False, bool act_quant=False, Tensor? lora_a13=None, Tensor? lora_b13=None, "
        "Tensor? lora_a2=None, Tensor? lora_b2=None",
        "Tensor",
        _grouped_experts_fake,
    ),
}


def _free_namespace(base: str = "dsv4") -> str:
    """`dsv4`, or the first `dsv4_<i>` whose ops are not defined yet (another copy of this module defined them)."""
    for i in itertools.count():
        namespace = base if i == 0 else f"{base}_{i}"
        if not hasattr(getattr(torch.ops, namespace), next(iter(SPECS))):
            return namespace
    raise AssertionError("unreachable")


def _unaliased(outputs, inputs):
    """Contiguous outputs that share no storage with an input or an earlier output (custom ops must not alias)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    fresh = []
    for out in outputs:
        out = out.contiguous()
        if out.numel() and out.untyped_storage().data_ptr() in seen:
            out = out.clone()
        if out.numel():
            seen.add(out.untyped_storage().data_ptr())
        fresh.append(out)
    return fresh


def _filler(reference: Callable) -> Callable[..., tuple]:
    """`fill(*args, **kwargs)` -> every argument of the custom op, positionally (the reference's, then `backend`):
    the dispatcher drops trailing arguments equal to their defaults, which are put back here."""
    params = [*inspect.signature(reference).parameters.values(), inspect.Parameter("backend", 1, default="auto")]
    names = [p.name for p in params]
    defaults = tuple(p.default for p in params)

    def fill(*args, **kwargs) -> tuple:
        out = tuple(args) + defaults[len(args) :]
        if kwargs:
            out = tuple(kwargs.get(name, value) for name, value in zip(names, out))
        return out

    return fill


def define_custom_ops(run: Callable[[str, tuple, dict, str], object], reference: dict[str, Callable]) -> dict:
    """Define every op of `SPECS` in a free namespace; `run(op, args, kwargs, backend)` executes a call on the backend
    the registry picks (arguments without a default in `args`, the others by name in `kwargs`); `reference[op]` is
    the reference function (the backward differentiates it).
    Returns {op: custom op}; call one as `custom(*args, backend=...)`."""
    namespace = _free_namespace()
    return {name: _define(namespace, name, spec, run, reference[name]) for name, spec in SPECS.items()}


def _define(namespace: str, name: str, spec: OpSpec, run: Callable, reference: Callable):
    fill = _filler(reference)

    params = list(inspect.signature(reference).parameters.values())
    n_required = sum(p.default is inspect.Parameter.empty for p in params)
    optional = [p.name for p in params[n_required:]]

    def forward(*args, **kwargs):
        *args, backend = fill(*args, **kwargs)
        out = run(name, tuple(args[:n_required]), dict(zip(optional, args[n_required:])), backend)
        fresh = _unaliased(out if isinstance(out, tuple) else (out,), args)
        return tuple(fresh) if isinstance(out, tuple) else fresh[0]

    def fake(*args, **kwargs):
        return spec.fake(*fill(*args, **kwargs)[:-1])

    schema = f"({spec.args}, str backend='auto') -> {spec.returns}"
    op = torch.library.custom_op(f"{namespace}::{name}", forward, mutates_args=(), schema=schema)
    op.register_fake(fake)
    if spec.differentiable:
        backward_op = _define_backward(namespace, name, spec, reference, fill)
        op.register_autograd(_backward_of(backward_op), setup_context=_setup_context)
    return op


@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """Record autograd again inside a custom op's implementation, where the dispatcher has excluded the autograd keys
    (the backward op differentiates the reference there). Private dispatcher API, as in `torch._higher_order_ops`."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _define_backward(namespace: str, name: str, spec: OpSpec, reference: Callable, fill: Callable):
    """`<op>_backward(grads, needs, *args)` -> the gradients of the inputs marked in `needs`, in order (recomputed
    through the reference's autograd)."""

    def backward(grads, needs, *args, **kwargs):
        args = fill(*args, **kwargs)[:-1]
        leaves = {i: a.detach().requires_grad_() for i, (a, need) in enumerate(zip(args, needs)) if need}
        got = [None] * len(leaves)
        with _autograd_inside_op():
            outs = reference(*(leaves.get(i, a) for i, a in enumerate(args)))
            outs = outs if isinstance(outs, tuple) else (outs,)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            if pairs:
                got = torch.autograd.grad(
                    [o for o, _ in pairs], list(leaves.values()), [g for _, g in pairs], allow_unused=True
                )
        got = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves.values(), got)]
        return _unaliased(got, [*args, *grads])

    def fake(grads, needs, *args, **kwargs):
        return [a.new_empty(a.shape) for a, need in zip(fill(*args, **kwargs), needs) if need]

    schema = f"(Tensor?[] grads, bool[] needs, {spec.args}) -> Tensor[]"
    op = torch.library.custom_op(f"{namespace}::{name}_backward", backward, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def _setup_context(ctx, inputs, output):
    args = inputs[:-1]
    ctx.tensor_slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    ctx.save_for_backward(*(args[i] for i in ctx.tensor_slots))
    ctx.other_args = [None if isinstance(a, torch.Tensor) else a for a in args]
    # The backward recomputes the forward under the same autocast state (as `torch.utils.checkpoint` does).
    device = args[0].device.type
    ctx.autocast = None
    if torch.amp.is_autocast_available(device):
        ctx.autocast = {
            "device_type": device,
            "dtype": torch.get_autocast_dtype(device),
            "enabled": torch.is_autocast_enabled(device),
        }


def _backward_of(backward_op):
    def backward(ctx, *grads):
        args = list(ctx.other_args)
        for i, tensor in zip(ctx.tensor_slots, ctx.saved_tensors):
            args[i] = tensor
        needs = [
            bool(need) and isinstance(a, torch.Tensor) and a.is_floating_point()
            for need, a in zip(ctx.needs_input_grad, args)
        ]
        if not any(needs):
            return (None,) * (len(args) + 1)
        with torch.autocast(**ctx.autocast) if ctx.autocast else contextlib.nullcontext():
            got = iter(backward_op(list(grads), needs, *args))
        return (*(next(got) if need else None for need in needs), None)

    return backward
