"""Backend registry of `modeling_deepseek_v4.ops`: forcing, env var, config backend, auto fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from modeling_deepseek_v4 import ops
from tests.ops.harness import reference_fn, registry_restored

torch.set_num_threads(1)

reference_rms_norm = reference_fn("rms_norm")


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Snapshot and restore the registry so fake backends never leak into other tests."""
    monkeypatch.delenv(ops.BACKEND_ENV_VAR, raising=False)
    with registry_restored():
        ops._LOGGED_FALLBACK.clear()
        yield


def _args():
    torch.manual_seed(0)
    return torch.randn(2, 8), torch.randn(8), 1e-6


def _fake(tag: float):
    def fn(x, weight, eps):
        return torch.full_like(x, tag)

    return fn


def test_every_op_has_reference():
    for op in ("rms_norm", "hc_pre", "hc_post", "hc_head", "compress_pool", "indexer_topk", "sparse_attention",
               "grouped_experts"):  # fmt: skip
        assert "reference" in ops.available_backends(op)
        assert callable(getattr(ops, op))


def test_use_backend_reference():
    x, w, eps = _args()
    with ops.use_backend("reference"):
        out = ops.rms_norm(x, w, eps)
    assert torch.equal(out, reference_rms_norm(x, w, eps))
    assert ops._FORCED == []


def _float64_args():
    # float64 (gradcheck inputs): no Triton kernel takes it, also where the interpreter runs kernels on the CPU
    x, w, eps = _args()
    return x.double(), w.double(), eps


def test_use_backend_triton_on_cpu_raises():
    x, w, eps = _float64_args()
    with pytest.raises(RuntimeError, match="triton"):
        with ops.use_backend("triton"):
            ops.rms_norm(x, w, eps)
    assert ops._FORCED == []  # the context manager unwinds on error


def test_env_var_triton_on_cpu_raises(monkeypatch):
    x, w, eps = _float64_args()
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="triton"):
        ops.rms_norm(x, w, eps)
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "Reference ")
    assert torch.equal(ops.rms_norm(x, w, eps), reference_rms_norm(x, w, eps))
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "auto")
    assert torch.equal(ops.rms_norm(x, w, eps), reference_rms_norm(x, w, eps))


def test_unknown_backend_names_raise_value_error(monkeypatch):
    x, w, eps = _args()
    with pytest.raises(ValueError, match="cuda_magic"):
        with ops.use_backend("cuda_magic"):
            pass
    with pytest.raises(ValueError):
        ops.register("rms_norm", "cuda_magic", _fake(1.0))
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "cuda_magic")
    with pytest.raises(ValueError, match=ops.BACKEND_ENV_VAR):
        ops.rms_norm(x, w, eps)


def test_auto_falls_back_when_triton_does_not_support(caplog):
    x, w, eps = _args()
    seen = []

    def supports(*args, **kwargs):
        seen.append((args, kwargs))
        return False

    ops.register("rms_norm", "triton", _fake(7.0), supports)
    assert ops.available_backends("rms_norm") == ["triton", "reference"]
    with caplog.at_level(logging.INFO, logger=ops.__name__):
        out = ops.rms_norm(x, w, eps)
        ops.rms_norm(x, w, eps)
    assert torch.equal(out, reference_rms_norm(x, w, eps))
    assert len(seen) == 2 and seen[0][0][0] is x  # supports sees the call's arguments
    assert sum("rms_norm" in r.getMessage() for r in caplog.records) == 1  # logged once
    with pytest.raises(RuntimeError, match="triton"):
        with ops.use_backend("triton"):
            ops.rms_norm(x, w, eps)
    with pytest.raises(RuntimeError):
        ops.rms_norm(x, w, eps, backend="triton")


def test_auto_prefers_supporting_triton():
    x, w, eps = _args()
    ops.register("rms_norm", "triton", _fake(7.0), lambda *a, **k: True)
    assert torch.equal(ops.rms_norm(x, w, eps), torch.full_like(x, 7.0))
    assert torch.equal(ops.rms_norm(x, w, eps, backend="auto"), torch.full_like(x, 7.0))
    # the config backend picks reference; a forced backend overrides the config
    assert torch.equal(ops.rms_norm(x, w, eps, backend="reference"), reference_rms_norm(x, w, eps))
    with ops.use_backend("triton"):
        assert torch.equal(ops.rms_norm(x, w, eps, backend="reference"), torch.full_like(x, 7.0))
        with ops.use_backend("reference"):  # innermost wins
            assert torch.equal(ops.rms_norm(x, w, eps), reference_rms_norm(x, w, eps))
        assert torch.equal(ops.rms_norm(x, w, eps), torch.full_like(x, 7.0))


def test_register_replaces():
    x, w, eps = _args()
    ops.register("rms_norm", "triton", _fake(1.0))
    ops.register("rms_norm", "triton", _fake(2.0))
    assert torch.equal(ops.rms_norm(x, w, eps), torch.full_like(x, 2.0))


def test_declared_backend_ranks_above_reference_and_can_be_forced():
    x, w, eps = _args()
    with pytest.raises(ValueError):
        ops.declare_backend("Auto")
    ops.declare_backend("mine")
    ops.declare_backend("mine")  # idempotent
    assert ops.BACKEND_PRIORITY == ("triton", "mine", "reference")
    ops.register("rms_norm", "mine", _fake(3.0))
    assert ops.available_backends("rms_norm") == ["mine", "reference"]
    assert torch.equal(ops.rms_norm(x, w, eps), torch.full_like(x, 3.0))  # auto: the first that supports the call
    with ops.use_backend("reference"):
        assert torch.equal(ops.rms_norm(x, w, eps), reference_rms_norm(x, w, eps))
    with pytest.raises(RuntimeError, match="mine"), ops.use_backend("mine"):
        ops.hc_post(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2), torch.zeros(1, 1, 2, 2))


def test_backends_get_required_arguments_by_position_and_defaults_by_name():
    seen = []

    def supports(*args, **kwargs):
        seen.append((len(args), sorted(kwargs)))
        return True

    ops.register("compress_pool", "triton", lambda kv, score, ratio, **kw: kv[:, ::ratio] * 0, supports)
    kv = torch.randn(1, 4, 3)
    out = ops.compress_pool(kv, kv, 2)
    assert seen == [(3, ["overlap_kv", "overlap_score"])] and torch.equal(out, torch.zeros(1, 2, 3))


def test_backends_in_use_shows_what_ran():
    """The choice is visible: per op, the registered backends and the one its latest call ran on."""
    x, w, eps = _args()
    ops.register("rms_norm", "triton", _fake(7.0), lambda x, *args, **kwargs: x.shape[0] > 1)
    ops.rms_norm(x, w, eps)
    assert ops.backends_in_use()["rms_norm"] == {"registered": ["triton", "reference"], "last_used": "triton"}
    ops.rms_norm(x[:1], w, eps)  # triton declines: auto falls back
    assert ops.backends_in_use()["rms_norm"]["last_used"] == "reference"
    ops.rms_norm(x, w, eps)
    with ops.use_backend("reference"):
        ops.rms_norm(x, w, eps)
    assert ops.backends_in_use()["rms_norm"]["last_used"] == "reference"
    assert set(ops.backends_in_use()) >= {"sparse_attention", "grouped_experts", "quantized_linear"}
