"""transformers' distributed engine on the plugin (parallel_plans.py): 2 gloo ranks on CPU load a saved tiny Flash-like
model (hash-routed first layers, CSA and HCA layers) with `DistributedConfig` and must give the single-process
logits (fp32, 1e-5): tensor parallelism (heads, grouped output projection, shared and routed experts, vocabulary),
expert parallelism through both of transformers' token dispatches (`all_reduce`, `all_to_all`) on top of it. The same
with the weights kept quantized like the official files (FP4 expert banks, FP8 linears in 32x32 blocks for the tiny
shapes; buffers, sharded by quantized_parallel.py): each rank holds only its slice of the bytes and scales, and
`save_pretrained` from the TP ranks writes the full tensors back byte for byte. Training: one backward under TP and
under TP + EP (transformers picks `all_to_all` when gradients flow) gives the single-process gradients (atol 1e-5,
rtol 1e-4), including the shared KV head's and the compressor's, whose per-rank gradients are partial; also with the
quantized storage (gradients of the parameters around the frozen FP8 / FP4 weights). Greedy `generate` with the
cache on the ranks (dense TP, quantized TP + EP) gives the one-process tokens; DSpark drafting on TP ranks gives the
one-process drafts and tokens.

One spawn runs every scenario (process start-up and imports dominate on 2 cores); each test reads its result."""

from __future__ import annotations

import traceback

import pytest
import torch

from tests.distributed.gloo import fork_ranks, process_group
from tests.distributed.inputs import greedy_generate as _generate
from tests.distributed.inputs import padded_prompts as _prompt
from tests.distributed.inputs import padded_rows as _inputs

WORLD = 2
ATOL = RTOL = 1e-5
SCENARIOS = {
    "tp": dict(tp_size=2),
    "ep_all_reduce": dict(tp_size=2, ep_size=2),
    "ep_all_to_all": dict(tp_size=2, ep_size=2, ep_implementation="all_to_all"),
    "fp4_tp": dict(tp_size=2),
    "fp4_ep_all_reduce": dict(tp_size=2, ep_size=2),
    "fp4_ep_all_to_all": dict(tp_size=2, ep_size=2, ep_implementation="all_to_all"),
    "dspark_tp": dict(tp_size=2),
}
TRAINED = ("tp", "ep_all_reduce", "fp4_tp", "fp4_ep_all_reduce")
# Kept like the official files: FP4 experts, FP8 linears (32x32 blocks: the tiny heads split into whole blocks), and
# sizes whose TP slices cover whole blocks (I = 64: 32 rows / 32 FP4 columns per rank; o_a_proj rows 2 x 32).
QUANTIZED = dict(
    dsv4_quantization={"weights": "fp8_block32", "experts": "fp4", "scale_dtype": "float32"},
    moe_intermediate_size=64,
    o_lora_rank=32,
)
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
# The quantized model's parameters: everything around the frozen FP8 / FP4 buffers.
QUANTIZED_GRAD_NAMES = (
    "model.embed_tokens.weight",
    "model.layers.0.attn_hc.fn",
    "model.layers.0.self_attn.sinks",
    "model.layers.2.mlp.gate.weight",
    "model.layers.3.self_attn.compressor.position_bias",
    "lm_head.weight",
)


GENERATED = ("tp", "fp4_ep_all_reduce")  # multi-rank inference with the cache: dense TP, quantized TP + EP


def _dspark_generate(model) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """`generate(use_dspark=True)` (batch 1: the first prompt, 160 tokens, 16 new) with every draft recorded: returns
    (tokens, the drafted ids of each round, their drafter logits)."""
    from modeling_deepseek_v4.dspark_drafting import DeepseekV4DSparkCandidateGenerator as Generator

    drafts, logits, original = [], [], Generator.get_candidates

    def recording(self, input_ids, *args, **kwargs):
        candidates, candidate_logits = original(self, input_ids, *args, **kwargs)
        if candidate_logits is not None:
            drafts.append(candidates[:, input_ids.shape[1] :].clone())
            logits.append(candidate_logits.clone())
        return candidates, candidate_logits

    Generator.get_candidates = recording
    try:
        ids = _prompt()["input_ids"][:1]
        kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
        out = model.generate(ids, use_dspark=True, **kw)
    finally:
        Generator.get_candidates = original
    return out, drafts, logits


def _local_shapes(model) -> dict[str, tuple[int, ...]]:
    """This rank's shapes of a few sharded tensors of layer 0 (a hash layer); quantized buffers as stored."""
    from torch.distributed.tensor import DTensor

    layer = model.model.layers[0]
    if hasattr(layer.mlp.experts, "stored"):
        attn, experts, shared = layer.self_attn, layer.mlp.experts, layer.mlp.shared_experts
        named = {
            "q_b_proj": attn.q_b_proj.weight,
            "q_b_proj_scale": attn.q_b_proj.weight_scale_inv,
            "o_a_proj": attn.o_a_proj.weight,
            "o_b_proj": attn.o_b_proj.weight,
            "shared_down": shared.down_proj.weight,
            "gate_up_proj": experts.gate_up_proj,
            "gate_up_proj_scale": experts.gate_up_proj_scale_inv,
            "down_proj": experts.down_proj,
            "down_proj_scale": experts.down_proj_scale_inv,
            "num_experts": torch.empty(experts.num_experts),
        }
        return {k: tuple((v.to_local() if isinstance(v, DTensor) else v).shape) for k, v in named.items()}
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
    names = QUANTIZED_GRAD_NAMES if hasattr(model.model.layers[0].mlp.experts, "stored") else GRAD_NAMES
    grads = {name: params[name].grad for name in names}
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
            folder = folders[name.split("_")[0] if name.startswith(("fp4", "dspark")) else "dense"]
            if failed:  # the ranks may be out of step after an unexpected error
                results[name] = {"error": f"not run: {failed} failed", "trace": ""}
                continue
            try:
                config = DistributedConfig(tp_plan=head or None, **kwargs)
                model = DeepseekV4ExtForCausalLM.from_pretrained(folder, distributed_config=config).eval()
                with torch.no_grad():
                    logits = model(**_inputs(), use_cache=False).logits
                results[name] = {"logits": logits, "shapes": _local_shapes(model), "plan": dict(model.tp_plan)}
                if name in GENERATED:
                    results[name]["generated"] = _generate(model)
                if name == "dspark_tp":
                    results[name]["dspark"] = _dspark_generate(model)
                if name == "fp4_tp":  # every rank takes part in gathering the shards; rank 0 writes
                    model.save_pretrained(f"{out}/saved_fp4_tp")
                    model.to(torch.float32)  # a cast re-wraps the sharded buffers, leaving their bytes alone
                    with torch.no_grad():
                        results[name]["logits_after_cast"] = model(**_inputs(), use_cache=False).logits
                if name in TRAINED:
                    results[name]["grads"] = _grads(model)
            except Exception as error:  # reported to the test
                results[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
                failed = name
        torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process reference logits of both models and every scenario's result on both ranks."""
    from tests.conftest import tiny_dspark_model, tiny_model

    root = tmp_path_factory.mktemp("tp_ep")
    folders, reference = {}, {}
    model = tiny_dspark_model()
    folders["dspark"] = str(root / "dspark")
    model.save_pretrained(folders["dspark"])
    with torch.no_grad():
        reference["dspark"] = model(**_inputs(), use_cache=False).logits
    reference["dspark_greedy"] = model.generate(
        _prompt()["input_ids"][:1], max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    reference["dspark_drafted"] = _dspark_generate(model)
    for kind, overrides in (("dense", {}), ("fp4", QUANTIZED)):
        model = tiny_model("flash", **overrides)
        folders[kind] = str(root / kind)
        model.save_pretrained(folders[kind])
        with torch.no_grad():
            reference[kind] = model(**_inputs(), use_cache=False).logits
        reference[f"{kind}_state"] = {k: v.clone() for k, v in model.state_dict().items()}
        reference[f"{kind}_generated"] = _generate(model)
        inputs = _inputs()
        model.train()(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
        names = GRAD_NAMES if kind == "dense" else QUANTIZED_GRAD_NAMES
        reference[f"{kind}_grads"] = {n: p.grad for n, p in model.named_parameters() if n in names}
    ranks = fork_ranks(_worker, WORLD, folders, out=root)  # the parent ran torch on 1 thread only
    reference["saved_fp4_tp"] = root / "saved_fp4_tp"
    return reference, ranks


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
    expected = reference["fp4_grads" if name.startswith("fp4") else "dense_grads"]
    for result in _ok(runs, name):
        assert result["grads"].keys() == expected.keys()
        for key, grad in result["grads"].items():
            torch.testing.assert_close(grad, expected[key], atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", ["fp4_tp", "fp4_ep_all_reduce", "fp4_ep_all_to_all"])
def test_quantized_storage_matches_single_process(runs, name):
    """FP4 banks and FP8 linears stay quantized, each rank holding its slice of the bytes and of the scales."""
    reference, _ = runs
    results = _ok(runs, name)
    for result in results:
        torch.testing.assert_close(result["logits"], reference["fp4"], atol=ATOL, rtol=RTOL)
        if name == "fp4_tp":
            torch.testing.assert_close(result["logits_after_cast"], result["logits"], atol=0, rtol=0)
    shapes = results[0]["shapes"]
    # FP8 32x32 blocks: q_b_proj [128, 32] -> rows 64 / scale [2, 1]; o_a_proj rows 2 x 32 -> 32; o_b_proj and the
    # shared down_proj split their 64 input columns (scale columns 2 -> 1)
    assert shapes["q_b_proj"] == (64, 32) and shapes["q_b_proj_scale"] == (2, 1)
    assert shapes["o_a_proj"] == (32, 64) and shapes["o_b_proj"] == (64, 32) and shapes["shared_down"] == (64, 32)
    if name == "fp4_tp":  # the intermediate dim split: gate and up rows 64 + 64 -> 32 + 32, down FP4 columns 64 -> 32
        assert shapes["gate_up_proj"] == (4, 64, 32) and shapes["gate_up_proj_scale"] == (4, 64, 2)
        assert shapes["down_proj"] == (4, 64, 16) and shapes["down_proj_scale"] == (4, 64, 1)
        assert shapes["num_experts"] == (4,)
    else:  # whole experts, 2 of 4 per rank
        assert shapes["gate_up_proj"] == (2, 128, 32) and shapes["gate_up_proj_scale"] == (2, 128, 2)
        assert shapes["down_proj"] == (2, 64, 32) and shapes["num_experts"] == (2,)


@pytest.mark.parametrize("name", GENERATED)
def test_generate_on_ranks_matches_single_process(runs, name):
    """Greedy `generate` with the cache (prefill of 160 tokens, left padding, 8 decode steps) on the sharded ranks
    gives the one-process tokens."""
    reference, _ = runs
    expected = reference["fp4_generated" if name.startswith("fp4") else "dense_generated"]
    assert expected.shape == (2, 168)
    for result in _ok(runs, name):
        assert torch.equal(result["generated"], expected)


def test_dspark_drafting_on_tensor_parallel_ranks_matches_single_process(runs):
    """DSpark drafting on TP ranks (main model sharded, the drafter replicated, reading the sharded embedding and
    vocabulary-parallel head): the same drafts, drafter logits and tokens as one process, and plain greedy's tokens."""
    reference, _ = runs
    tokens, drafts, logits = reference["dspark_drafted"]
    assert torch.equal(tokens, reference["dspark_greedy"]) and len(drafts) >= 4
    for result in _ok(runs, "dspark_tp"):
        torch.testing.assert_close(result["logits"], reference["dspark"], atol=ATOL, rtol=RTOL)
        rank_tokens, rank_drafts, rank_logits = result["dspark"]
        assert torch.equal(rank_tokens, tokens)
        assert len(rank_drafts) == len(drafts)
        for ours, theirs in zip(rank_drafts, drafts):
            assert torch.equal(ours, theirs)
        for ours, theirs in zip(rank_logits, logits):
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


def test_quantized_save_from_tensor_parallel_ranks_is_exact(runs):
    """`save_pretrained` on the TP ranks gathers each sharded buffer: the folder holds the original bytes, scales."""
    from safetensors.torch import load_file

    reference, _ = runs
    _ok(runs, "fp4_tp")
    saved = {}
    for shard in sorted(reference["saved_fp4_tp"].glob("*.safetensors")):
        saved.update(load_file(shard))
    expected = reference["fp4_state"]
    assert saved.keys() == expected.keys()
    for key, tensor in saved.items():
        assert tensor.dtype == expected[key].dtype and tensor.shape == expected[key].shape, key
        assert torch.equal(tensor.view(torch.uint8), expected[key].view(torch.uint8)), key
