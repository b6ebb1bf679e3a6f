"""Grouped expert LoRA (expert_lora.py) under transformers' expert parallelism: 2 gloo ranks load a saved tiny
Flash-like model with `DistributedConfig(tp_size=2, ep_size=2)`, wrap it with `get_peft_model(expert_lora_config(r=4,
target_modules=["experts"]))` and set the factors from the global expert index (factor[e] = f(layer, e)), so each rank
holds the slice of its own experts. Against one process with the same factors (fp32, atol / rtol 1e-5):
- inference logits (transformers' `all_reduce` dispatch: off-rank routes come as the sentinel id) and training logits
  (`all_to_all` dispatch, local expert ids on received rows);
- after one backward, each rank's local factor gradients equal the single-process gradients of the same experts;
- shared factors (`rank_pattern={"experts.shared": 1}`, replicated): gradients summed over the EP group equal the
  single-process ones;
- merging the adapter into the sharded banks keeps the logits;
- `save_pretrained` from the EP ranks writes the factors of all experts (the adapter equals one saved by one
  process), and loading it back into an EP model gives each rank its experts' factors (logits unchanged); a
  one-process model loads it too;
- tensor parallelism alone (routed experts split along the intermediate dim) is refused with a clear error;
- grouped LoRA on `o_a_proj` under tensor parallelism (`tp_size=2`: each rank holds its head groups' rows and
  factors, set from the global group index), dense and FP8 (with expert LoRA under EP beside it): all of the above.

One spawn runs both scenarios (process start-up and imports dominate on 2 cores); each test reads its result."""

from __future__ import annotations

import traceback
import zlib

import pytest
import torch
import torch.distributed as dist

from tests.distributed.gloo import fork_ranks, process_group
from tests.distributed.test_tensor_expert_parallel import QUANTIZED, WORLD, _inputs

pytest.importorskip("peft")

ATOL = RTOL = 1e-5
EXPERTS = r".*\.layers\.\d+\.mlp\.experts"  # not the MTP block's experts: no loss trains them here
GROUPS = r".*\.layers\.\d+\.self_attn\.o_a_proj"
EP = dict(tp_size=2, ep_size=2)
# scenario: LoRA config keywords, targets, DistributedConfig keywords, model (dense, or kept like the official files:
# FP4 experts, FP8 linears; merging re-quantizes this rank's experts / groups, byte for byte as one process does)
SCENARIOS = {
    "per_expert": ({}, EXPERTS, EP, {}),
    "shared": ({"rank_pattern": {"experts.shared": 1}}, EXPERTS, EP, {}),
    "fp4_per_expert": ({}, EXPERTS, EP, QUANTIZED),
    "groups_tp": ({}, GROUPS, dict(tp_size=2), {}),
    "fp8_groups_and_experts": ({}, f"{EXPERTS}|{GROUPS}", EP, QUANTIZED),
}


def _lora(model, scenario: str):
    """`model` with grouped LoRA; every factor set from its name and the global expert / group index. Returns the
    PEFT model and, per LoRA layer, the global index of its first local expert / group."""
    from peft import get_peft_model

    from modeling_deepseek_v4.expert_lora import DeepseekV4ExpertsLora, DeepseekV4GroupedLinearLora, expert_lora_config

    kwargs, targets, _, _ = SCENARIOS[scenario]
    model = get_peft_model(model, expert_lora_config(r=4, target_modules=targets, **kwargs))
    offsets = {}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if not isinstance(layer, (DeepseekV4ExpertsLora, DeepseekV4GroupedLinearLora)):
                continue
            experts = isinstance(layer, DeepseekV4ExpertsLora)
            # Shard(0) over the EP / TP mesh: rank i holds a contiguous range of experts / groups
            bank = layer.get_base_layer().gate_up_proj if experts else layer.get_base_layer().weight
            mesh = getattr(bank, "device_mesh", None)
            local = layer.lora_A["default"].gate_up_proj if experts else layer.lora_A["default"].weight
            offsets[name] = mesh.get_local_rank() * local.shape[0] if mesh is not None else 0
            shared = scenario == "shared"
            start = 0 if shared else offsets[name]  # shared factors: one pair, the same on every rank
            for param_name, param in layer.named_parameters():
                if "lora_" not in param_name:
                    continue
                rows = 1 if shared else model.config.n_routed_experts if experts else model.config.o_groups
                seed = zlib.crc32(f"{name}.{param_name}".encode())
                full = torch.randn(rows, *param.shape[1:], generator=torch.Generator().manual_seed(seed)) * 0.2
                param.copy_(full[start : start + param.shape[0]])
    return model, offsets


def _run(model, offsets: dict[str, int]) -> dict:
    """Inference and training logits, this rank's LoRA gradients, and the inference logits with the adapter merged."""
    inputs = _inputs()
    with torch.no_grad():
        logits = model.eval()(**inputs, use_cache=False).logits
    output = model.train()(**inputs, labels=inputs["input_ids"], use_cache=False)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name}
    model.eval().merge_adapter()
    with torch.no_grad():
        merged = model(**inputs, use_cache=False).logits
    model.unmerge_adapter()
    return {"logits": logits, "train_logits": output.logits.detach(), "grads": grads, "merged": merged, **offsets}


def _worker(rank: int, port: int, folders: dict[str, str], out: str) -> None:
    with process_group(rank, WORLD, port, timeout_s=60):
        from transformers.distributed import DistributedConfig

        from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
        from modeling_deepseek_v4.expert_lora import load_expert_lora
        from modeling_deepseek_v4.parallel_plans import CAUSAL_LM_TP_PLAN

        head = {} if getattr(DeepseekV4ExtForCausalLM, "_tp_plan", None) else dict(CAUSAL_LM_TP_PLAN)
        results, failed = {}, None
        try:  # routed experts split by TP (intermediate dim): refused when the LoRA layers are made
            model = DeepseekV4ExtForCausalLM.from_pretrained(
                folders["per_expert"], distributed_config=DistributedConfig(tp_plan=head or None, tp_size=2)
            )
            _lora(model, "per_expert")
            results["tp_only"] = {"error": "none"}
        except NotImplementedError as error:
            results["tp_only"] = {"error": str(error)}
        for scenario in SCENARIOS:
            if failed:  # the ranks may be out of step after an unexpected error
                results[scenario] = {"error": f"not run: {failed} failed", "trace": ""}
                continue
            try:
                config = DistributedConfig(tp_plan=head or None, **SCENARIOS[scenario][2])
                folder = folders[scenario]
                model = DeepseekV4ExtForCausalLM.from_pretrained(folder, distributed_config=config)
                peft_model, offsets = _lora(model, scenario)
                results[scenario] = _run(peft_model, offsets)
                # every rank joins the gather of the factors; rank 0 writes (as the Trainer calls it)
                peft_model.save_pretrained(f"{out}/adapter_{scenario}", is_main_process=rank == 0)
                dist.barrier()
                fresh = DeepseekV4ExtForCausalLM.from_pretrained(folder, distributed_config=config)
                reloaded = load_expert_lora(fresh, f"{out}/adapter_{scenario}")
                with torch.no_grad():
                    results[scenario]["reloaded"] = reloaded.eval()(**_inputs(), use_cache=False).logits
            except Exception as error:
                results[scenario] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
                failed = scenario
        torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process results of every scenario (and the logits without LoRA) and both ranks' results."""
    from tests.conftest import tiny_model

    root = tmp_path_factory.mktemp("lora_ep")
    reference, folders = {}, {}
    for scenario, (*_, overrides) in SCENARIOS.items():
        model = tiny_model("flash", **overrides)
        folders[scenario] = str(root / f"model_{scenario}")
        model.save_pretrained(folders[scenario])
        with torch.no_grad():
            reference[f"base_{scenario}"] = model(**_inputs(), use_cache=False).logits
    for scenario in SCENARIOS:
        peft_model, offsets = _lora(tiny_model("flash", **SCENARIOS[scenario][3]), scenario)
        reference[scenario] = _run(peft_model, offsets)
        peft_model.save_pretrained(root / f"single_{scenario}")
    ranks = fork_ranks(_worker, WORLD, folders, out=root)
    reference["root"] = root
    return reference, ranks


def _ok(runs, scenario: str) -> list[dict]:
    results = [ranks[scenario] for ranks in runs[1]]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('trace')}"
    return results


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_logits_match_single_process(runs, scenario):
    reference, _ = runs
    ref = reference[scenario]
    assert not torch.allclose(ref["logits"], reference[f"base_{scenario}"], atol=1e-3), "the LoRA changes nothing"
    for result in _ok(runs, scenario):
        for key in ("logits", "train_logits", "merged"):
            torch.testing.assert_close(result[key], ref[key], atol=ATOL, rtol=RTOL, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_local_factor_gradients_match_single_process(runs, scenario):
    reference, _ = runs
    ref = reference[scenario]
    for rank, result in enumerate(_ok(runs, scenario)):
        assert result["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) >= 4  # A / B x 2 per layer
        for name, grad in result["grads"].items():
            layer = name.split(".lora_")[0]
            if scenario != "shared":  # 2 of the 4 experts, 1 of the 2 head groups per rank
                assert grad.shape[0] * rank == result[layer] and grad.shape[0] == (1 if "o_a_proj" in name else 2)
            start = 0 if scenario == "shared" else result[layer]
            expected = ref["grads"][name][start : start + grad.shape[0]]
            torch.testing.assert_close(grad, expected, atol=ATOL, rtol=RTOL, msg=lambda m, k=name: f"{k}: {m}")


def test_tensor_parallel_experts_are_refused(runs):
    for ranks in runs[1]:
        assert "not supported: load with `DistributedConfig(ep_size=...)`" in ranks["tp_only"]["error"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_adapter_saved_under_expert_parallelism_holds_every_expert(runs, scenario):
    """The EP ranks' adapter equals the one-process adapter tensor for tensor; it reloads on the EP ranks and in one
    process with the logits of the model that was saved."""
    from safetensors.torch import load_file

    from modeling_deepseek_v4.expert_lora import load_expert_lora
    from tests.conftest import tiny_model

    reference, _ = runs
    for result in _ok(runs, scenario):
        torch.testing.assert_close(result["reloaded"], result["logits"], atol=0, rtol=0)
    root = reference["root"]
    saved, single = (
        load_file(root / f"{kind}_{scenario}" / "adapter_model.safetensors") for kind in ("adapter", "single")
    )
    assert saved.keys() == single.keys() and len(saved) >= 4
    for key, tensor in saved.items():
        assert torch.equal(tensor, single[key]), key
    model = load_expert_lora(tiny_model("flash", **SCENARIOS[scenario][3]), root / f"adapter_{scenario}")
    with torch.no_grad():
        logits = model.eval()(**_inputs(), use_cache=False).logits
    torch.testing.assert_close(logits, reference[scenario]["logits"], atol=ATOL, rtol=RTOL)
