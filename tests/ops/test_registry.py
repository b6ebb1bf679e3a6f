"""Backend registry of `modeling_deepseek_v4.ops`: forcing, env var, config backend, auto fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from modeling_deepseek_v4 import ops, ops_reference

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Snapshot and restore the registry so fake backends never leak into other tests."""
    monkeypatch.delenv(ops.BACKEND_ENV_VAR, raising=False)
    saved = {op: dict(impls) for op, impls in ops._REGISTRY.items()}
    saved_logged = set(ops._LOGGED_FALLBACK)
    saved_forced = list(ops._FORCED)
    ops._LOGGED_FALLBACK.clear()
    try:
        yield
    finally:
        ops._REGISTRY.clear()
        ops._REGISTRY.update(saved)
        ops._LOGGED_FALLBACK.clear()
        ops._LOGGED_FALLBACK.update(saved_logged)
        ops._FORCED[:] = saved_forced


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
    assert torch.equal(out, ops_reference.rms_norm(x, w, eps))
    assert ops._FORCED == []


def test_use_backend_triton_on_cpu_raises():
    x, w, eps = _args()
    with pytest.raises(RuntimeError, match="triton"):
        with ops.use_backend("triton"):
            ops.rms_norm(x, w, eps)
    assert ops._FORCED == []  # the context manager unwinds on error


def test_env_var_triton_on_cpu_raises(monkeypatch):
    x, w, eps = _args()
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="triton"):
        ops.rms_norm(x, w, eps)
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "Reference ")
    assert torch.equal(ops.rms_norm(x, w, eps), ops_reference.rms_norm(x, w, eps))
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "auto")
    assert torch.equal(ops.rms_norm(x, w, eps), ops_reference.rms_norm(x, w, eps))


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
    assert torch.equal(out, ops_reference.rms_norm(x, w, eps))
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
    assert torch.equal(ops.rms_norm(x, w, eps, backend="reference"), ops_reference.rms_norm(x, w, eps))
    with ops.use_backend("triton"):
        assert torch.equal(ops.rms_norm(x, w, eps, backend="reference"), torch.full_like(x, 7.0))
        with ops.use_backend("reference"):  # innermost wins
            assert torch.equal(ops.rms_norm(x, w, eps), ops_reference.rms_norm(x, w, eps))
        assert torch.equal(ops.rms_norm(x, w, eps), torch.full_like(x, 7.0))


def test_register_replaces():
    x, w, eps = _args()
    ops.register("rms_norm", "triton", _fake(1.0))
    ops.register("rms_norm", "triton", _fake(2.0))
    assert torch.equal(ops.rms_norm(x, w, eps), torch.full_like(x, 2.0))
