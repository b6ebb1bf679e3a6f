"""The custom ops and the optional-backend loader (design.md, "Backend dispatch"): schemas, fakes on every call of a
model, autocast in the recomputed backward, weight views, a second copy of the module, the loader, and the compiled
static-cache decode step as one graph over the custom ops."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

from modeling_deepseek_v4 import ops
from modeling_deepseek_v4.ops_backends import OptionalBackend, load_backends, triton_usable
from modeling_deepseek_v4.ops_custom import SPECS, define_custom_ops
from modeling_deepseek_v4.static_cache import DeepseekV4StaticCache
from tests.conftest import tiny_model
from tests.ops.harness import (
    CLONE,
    CLONE_CALLS,
    DENSE_OPS,
    clone_backend,
    make_case,
    reference_fn,
    registry_restored,
)

torch.set_num_threads(1)


def test_every_dense_op_is_a_custom_op_with_the_reference_signature():
    assert set(SPECS) == set(DENSE_OPS)
    for name in DENSE_OPS:
        schema = ops.CUSTOM_OPS[name]._opoverload._schema
        params = inspect.signature(reference_fn(name)).parameters.values()
        expected = [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params]
        got = [(a.name, a.default_value if a.has_default_value() else None) for a in schema.arguments]
        assert got == [*expected, ("backend", "auto")], name
        assert schema.name == f"dsv4::{name}"


def _check_fake(name):
    """A backend that runs the reference and checks the op's fake implementation against what it returned."""

    def fn(*args, **kwargs):
        out = reference_fn(name)(*args, **kwargs)
        fake = SPECS[name].fake(*args, **kwargs)
        for real, meta in zip(out if isinstance(out, tuple) else (out,), fake if isinstance(fake, tuple) else (fake,)):
            assert (real.shape, real.dtype) == (meta.shape, meta.dtype), name
            assert meta.is_contiguous()
        CHECKED[name] = CHECKED.get(name, 0) + 1
        return out

    return fn


CHECKED: dict[str, int] = {}


def test_fakes_agree_with_every_call_of_a_model():
    """Prefill, cached decode, static-cache decode, bf16, reference numerics, autocast and training: every op call."""
    CHECKED.clear()
    ids = torch.randint(2, 97, (2, 26), generator=torch.Generator().manual_seed(0))
    with registry_restored():
        ops.declare_backend("fake_check")
        for name in DENSE_OPS:
            ops.register(name, "fake_check", _check_fake(name))
        with ops.use_backend("fake_check"):
            for schedule in ("flash", "pro"):
                model = tiny_model(schedule)
                with torch.no_grad():
                    out = model(ids[:, :20])
                    model(ids[:, 20:22], past_key_values=out.past_key_values)
                    cache = DeepseekV4StaticCache(model.config, max_cache_len=32)
                    model(ids[:, :20], past_key_values=cache)
                    model(ids[:, 20:21], past_key_values=cache)
                    model.to(torch.bfloat16)(ids, use_cache=False)
            with torch.no_grad():
                tiny_model(reference_numerics=True)(ids, use_cache=False)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    tiny_model()(ids, use_cache=False)
            model = tiny_model().train()
            model(ids, labels=ids, use_cache=False).loss.backward()
    assert set(CHECKED) == set(DENSE_OPS)


@pytest.mark.parametrize("op,variant", [("sparse_attention", "csa"), ("grouped_experts", "dynamic"), ("hc_pre", "n4")])
def test_backward_recomputes_under_the_forward_autocast(op, variant):
    """Forward under CPU autocast, backward outside it (as training loops do): the gradients are those of plain
    autograd through the reference, so the recompute ran under the forward's autocast state."""
    case = make_case(op, variant, torch.float32)
    names = list(inspect.signature(reference_fn(op)).parameters)

    def grads(fn, autocast: bool):
        leaves = []

        def prep(name, value):
            if isinstance(value, torch.Tensor) and name in case.grad:
                value = value.detach().clone().requires_grad_()
                leaves.append(value)
            return value

        args = [prep(n, v) for n, v in zip(names, case.args)]
        kwargs = {n: prep(n, v) for n, v in case.kwargs.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(*args, **kwargs)
        loss = sum((o.float() ** 2).sum() for o in (out if isinstance(out, tuple) else (out,)))
        return torch.autograd.grad(loss, leaves)

    expected = grads(reference_fn(op), autocast=True)
    assert any(not torch.equal(a, b) for a, b in zip(expected, grads(reference_fn(op), autocast=False)))
    assert all(torch.equal(a, b) for a, b in zip(grads(getattr(ops, op), autocast=True), expected))


class _View:
    """A stand-in for `PackedWeight`: indexing returns the selected experts."""

    def __init__(self, weight):
        self.weight, self.shape = weight, weight.shape

    def __getitem__(self, index):
        return self.weight[index]


@pytest.mark.parametrize("static", [False, True])
def test_grouped_experts_over_weight_views_keeps_plain_dispatch(static):
    case = make_case("grouped_experts", "static" if static else "dynamic", torch.float32)
    x, gate_up, down, *rest = case.args
    seen = []
    with registry_restored():
        ops.register(
            "grouped_experts", "triton", reference_fn("grouped_experts"), lambda *a, **k: seen.append(a) or True
        )
        dense = ops.grouped_experts(x, gate_up, down, *rest, static_shapes=static)
        viewed = ops.grouped_experts(x, _View(gate_up), _View(down), *rest, static_shapes=static)
    assert torch.equal(viewed, dense)
    assert isinstance(seen[1][1], _View)  # the backend received the view itself, not a tensor


def test_a_second_copy_of_the_module_gets_its_own_namespace():
    """The Hub copy of the folder, imported next to the pip package, defines its ops elsewhere and dispatches to
    its own registry."""
    calls = []

    def run(op, args, kwargs, backend):
        calls.append((op, backend))
        return reference_fn(op)(*args, **kwargs)

    second = define_custom_ops(run, {name: reference_fn(name) for name in DENSE_OPS})
    namespace = second["rms_norm"]._opoverload._schema.name.split("::")[0]
    assert namespace.startswith("dsv4_")
    x = torch.randn(2, 8)
    assert torch.equal(second["rms_norm"](x, None, 1e-6, backend="reference"), ops.rms_norm(x, None, 1e-6))
    assert calls == [("rms_norm", "reference")]


def test_loader_loads_backends_whose_requirements_hold(caplog):
    def broken():
        raise ImportError("no module named triton_fancy")

    with registry_restored():
        skipped = OptionalBackend("never", lambda: False, lambda: pytest.fail("loaded without its requirement"))
        failing = OptionalBackend("broken", lambda: True, broken)
        with caplog.at_level(logging.WARNING):
            assert load_backends([skipped, failing]) == []
        assert "broken" in caplog.text and "triton_fancy" in caplog.text
        with clone_backend():
            assert ops.available_backends("sparse_attention") == [CLONE, "reference"]
        assert ops.available_backends("sparse_attention") == ["reference"]


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the requirement may hold")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_usable()


def test_compiled_decode_step_is_one_graph_over_the_custom_ops():
    """`fullgraph=True` (raises on any graph break) on the static-cache decode step: one graph, every dense op in it
    as a single custom-op node (the reference is not traced), logits equal to eager; `use_backend` still reaches
    the compiled graph's ops at run time, without a recompile."""
    model = tiny_model()
    ids = torch.randint(2, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def decode(steps=3):
        cache = DeepseekV4StaticCache(model.config, max_cache_len=32)
        with torch.no_grad():
            model(ids[:, :20], past_key_values=cache)
            return torch.cat(
                [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(20, 20 + steps)], 1
            )

    eager = decode()
    torch._dynamo.reset()
    model.model.compile_decode(backend=recording_backend, fullgraph=True)
    try:
        compiled = decode()
        assert len(graphs) == 1
        targets = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
        for name in DENSE_OPS:
            assert ops.CUSTOM_OPS[name]._opoverload in targets, name
        # Nothing of the reference was traced (its softmaxes, rsqrt norms, indexer GEMMs, expert sort).
        assert not {torch.softmax, torch.rsqrt, torch.bmm, torch.argsort} & targets
        with clone_backend():
            CLONE_CALLS.clear()
            with ops.use_backend(CLONE):
                forced = decode(steps=1)
            assert set(CLONE_CALLS) == set(DENSE_OPS)
        assert len(graphs) == 1
    finally:
        model.model.__dict__.pop("_compiled_decode_step")
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)
    assert torch.equal(forced, eager[:, :1])
