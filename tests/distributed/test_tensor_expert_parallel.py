"""transformers' distributed engine on the plugin (parallel_plans.py): 2 gloo ranks on CPU load a saved tiny Flash-like
model (hash-routed first layers, CSA and HCA layers) with `DistributedConfig` and must give the single-process
logits (fp32, 1e-5): tensor parallelism (heads, grouped output projection, shared and routed experts, vocabulary),
expert parallelism through both of transformers' token dispatches (`all_reduce`, `all_to_all`) on top of it, and the
clear error for FP4 expert banks (buffers, which the engine cannot shard). Training: one backward under TP and under
TP + EP (transformers picks `all_to_all` when gradients flow) gives the single-process gradients (atol 1e-5, rtol
1e-4), including the shared KV head's and the compressor's, whose per-rank gradients are partial.

One spawn runs every scenario (process start-up and imports dominate on 2 cores); each test reads its result."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed.gloo import free_port, process_group

WORLD = 2
ATOL = RTOL = 1e-5
SCENARIOS = {
    "tp": dict(tp_size=2),
    "ep_all_reduce": dict(tp_size=2, ep_size=2),
    "ep_all_to_all": dict(tp_size=2, ep_size=2, ep_implementation="all_to_all"),
    "fp4_ep": dict(tp_size=2, ep_size=2),
    "fp4_tp": dict(tp_size=2),
}
TRAINED = ("tp", "ep_all_reduce")
# Gradients compared with one process: sharded ones (q_b_proj, sinks, o_a_proj, experts, vocabulary) and replicated
# ones upstream of the sharded heads (the shared KV head, the compressor, q_a_proj, mHC, the embedding).
GRAD_NAMES = (
    "model.embed_tokens.weight",
    "model.layers.0.attn_hc.fn",
    "model.layers.0.self_attn.q_a_proj.weight",
    "model.layers.0.self_attn.q_b_proj.weight",
    "model.layers.0.self_attn.sinks",
    "model.layers.0.self_attn.kv_proj.weight",
    "model.layers.2.self_attn.o_a_proj.weight",
    "model.layers.2.self_attn.compressor.kv_proj.weight",
    "model.layers.3.self_attn.compressor.gate_proj.weight",
    "model.layers.0.mlp.experts.gate_up_proj",
    "model.layers.3.mlp.experts.down_proj",
    "model.layers.1.mlp.shared_experts.down_proj.weight",
    "lm_head.weight",
)


def _inputs() -> dict[str, torch.Tensor]:
    """Two rows of 24 tokens (several CSA / HCA entries, indexer top-k 3 really selects), the second left-padded."""
    ids = torch.randint(2, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _local_shapes(model) -> dict[str, tuple[int, ...]]:
    """This rank's shapes of a few sharded tensors of layer 0 (a hash layer)."""
    from torch.distributed.tensor import DTensor

    layer = model.model.layers[0]
    named = {
        "q_b_proj": layer.self_attn.q_b_proj.weight,
        "sinks": layer.self_attn.sinks,
        "o_a_proj": layer.self_attn.o_a_proj.weight,
        "o_b_proj": layer.self_attn.o_b_proj.weight,
        "shared_down": layer.mlp.shared_experts.down_proj.weight,
        "gate_up_proj": layer.mlp.experts.gate_up_proj,
        "down_proj": layer.mlp.experts.down_proj,
        "lm_head": model.lm_head.weight,
    }
    return {k: tuple((v.to_local() if isinstance(v, DTensor) else v).shape) for k, v in named.items()}


def _grads(model) -> dict[str, torch.Tensor]:
    """One training forward / backward on `_inputs()`; the full gradients of `GRAD_NAMES`."""
    from torch.distributed.tensor import DTensor

    model.train()
    inputs = _inputs()
    model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
    params = dict(model.named_parameters())
    grads = {name: params[name].grad for name in GRAD_NAMES}
    return {k: g.full_tensor() if isinstance(g, DTensor) else g for k, g in grads.items()}


def _worker(rank: int, port: int, folders: dict[str, str], out: str) -> None:
    with process_group(rank, WORLD, port, timeout_s=60):
        from transformers.distributed import DistributedConfig

        from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
        from modeling_deepseek_v4.parallel_plans import CAUSAL_LM_TP_PLAN

        # `lm_head` is sharded by `DeepseekV4ExtForCausalLM._tp_plan` where the class has it, else by an override.
        head = {} if getattr(DeepseekV4ExtForCausalLM, "_tp_plan", None) else dict(CAUSAL_LM_TP_PLAN)
        results, failed = {}, None
        for name, kwargs in SCENARIOS.items():
            folder = folders["fp4" if name.startswith("fp4") else "dense"]
            if failed:  # the ranks may be out of step after an unexpected error
                results[name] = {"error": f"not run: {failed} failed", "trace": ""}
                continue
            try:
                config = DistributedConfig(tp_plan=head or None, **kwargs)
                model = DeepseekV4ExtForCausalLM.from_pretrained(folder, distributed_config=config).eval()
                with torch.no_grad():
                    logits = model(**_inputs(), use_cache=False).logits
                results[name] = {"logits": logits, "shapes": _local_shapes(model), "plan": dict(model.tp_plan)}
                if name in TRAINED:
                    results[name]["grads"] = _grads(model)
            except Exception as error:  # reported to the test, which decides whether it was expected
                results[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
                failed = None if name.startswith("fp4") else name
        torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process reference logits of both models and every scenario's result on both ranks."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    from tests.conftest import tiny_model

    root = tmp_path_factory.mktemp("tp_ep")
    folders, reference, grads = {}, {}, {}
    for kind, overrides in (
        ("dense", {}),
        ("fp4", {"dsv4_quantization": {"weights": None, "experts": "fp4", "scale_dtype": "float32"}}),
    ):
        model = tiny_model("flash", **overrides)
        folders[kind] = str(root / kind)
        model.save_pretrained(folders[kind])
        with torch.no_grad():
            reference[kind] = model(**_inputs(), use_cache=False).logits
        if kind == "dense":
            inputs = _inputs()
            model.train()(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
            grads = {name: param.grad for name, param in model.named_parameters() if name in GRAD_NAMES}
    # fork, not spawn: the ranks inherit the imported modules (re-importing transformers costs ~15 s per rank on 2
    # cores); the parent ran torch on 1 thread only and never initialized a process group.
    mp.start_processes(_worker, args=(free_port(), folders, str(root)), nprocs=WORLD, start_method="fork")
    reference["grads"] = grads
    return reference, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _ok(runs, name: str) -> list[dict]:
    results = [ranks[name] for ranks in runs[1]]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('trace')}"
    return results


def test_tensor_parallel_matches_single_process(runs):
    reference, _ = runs
    results = _ok(runs, "tp")
    for result in results:
        torch.testing.assert_close(result["logits"], reference["dense"], atol=ATOL, rtol=RTOL)
    # heads, groups, shared and routed experts' intermediate dim, vocabulary: really split (tiny config: H=4, D=32,
    # g=2, d_g=16, d=64, I=32, E=4, vocab 97 -> 49 + 48)
    shapes = [r["shapes"] for r in results]
    assert shapes[0]["q_b_proj"] == (64, 32) and shapes[0]["sinks"] == (2,) and shapes[0]["o_a_proj"] == (16, 64)
    assert shapes[0]["o_b_proj"] == (64, 16) and shapes[0]["shared_down"] == (64, 16)
    assert shapes[0]["gate_up_proj"] == (4, 32, 64) and shapes[0]["down_proj"] == (4, 64, 16)
    assert (shapes[0]["lm_head"], shapes[1]["lm_head"]) == ((49, 64), (48, 64))
    assert "model.layers.*.self_attn.q_b_proj" in results[0]["plan"]


@pytest.mark.parametrize("name", ["ep_all_reduce", "ep_all_to_all"])
def test_expert_parallel_matches_single_process(runs, name):
    reference, _ = runs
    results = _ok(runs, name)
    for result in results:
        torch.testing.assert_close(result["logits"], reference["dense"], atol=ATOL, rtol=RTOL)
        # whole experts: 2 of 4 per rank, full intermediate dim (EP rules replace the experts' TP rules)
        assert result["shapes"]["gate_up_proj"] == (2, 64, 64) and result["shapes"]["down_proj"] == (2, 64, 32)
        assert result["shapes"]["q_b_proj"] == (64, 32)  # attention stays tensor-parallel


@pytest.mark.parametrize("name", TRAINED)
def test_gradients_match_single_process(runs, name):
    reference, _ = runs
    for result in _ok(runs, name):
        assert result["grads"].keys() == reference["grads"].keys()
        for key, grad in result["grads"].items():
            torch.testing.assert_close(
                grad, reference["grads"][key], atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}"
            )


@pytest.mark.parametrize("name", ["fp4_ep", "fp4_tp"])
def test_quantized_expert_banks_refuse_sharding(runs, name):
    """FP4 banks are buffers: loaded whole on every rank, so the sharded forward would be wrong (TP: the all-reduce
    would double the routed output). The first forward says so instead."""
    for ranks in runs[1]:
        error = ranks[name].get("error", "")
        assert error.startswith("NotImplementedError") and "nn.Parameters only" in error, ranks[name]
