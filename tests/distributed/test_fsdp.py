"""FSDP2 on 2 gloo CPU ranks, through accelerate and through transformers' `DistributedConfig(fsdp_size=2)`: full
fine-tuning and grouped expert LoRA give the single-process losses and weights of the same global batch, decoder
layers (and the MTP block, a subclass) are FSDP units, router buffers and mHC parameters come through sharding, and
a sharded checkpoint resumes to the losses of not stopping.

Tolerances (fp32, AdamW lr 1e-3 eps 1e-6): losses 1e-5 absolute (observed <= 5e-7: two ranks reduce gradients in
another order than one process sums them), weights after 3 steps 2e-5 absolute (observed ~1e-6; 3 steps move
weights by up to 3e-3, so a parameter left out of sharding or synchronization shows). Resumed losses equal the
uninterrupted run's to 1e-6 (observed 0: same ranks, same order of operations).
Runtime: one spawn of 2 ranks for all scenarios, ~35-50 s on 2 CPU cores (imports dominate).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed import fsdp_ranks
from tests.distributed.gloo import free_port

LOSS_TOL, WEIGHT_TOL, RESUME_TOL = 1e-5, 2e-5, 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario of `fsdp_ranks.py`, run once on 2 ranks: `{name: result}`."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    pytest.importorskip("accelerate")
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("fsdp")
    fsdp_ranks.build_model(0).save_pretrained(out / "init")
    mp.spawn(fsdp_ranks.run_all, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return {**torch.load(out / "rank0.pt", weights_only=False), "init": out / "init"}


def _single_process(lora: bool) -> dict:
    """The same 3 steps on the whole global batch in this process."""
    model = fsdp_ranks.build_model(0, lora)
    optimizer = fsdp_ranks.optimizer_for(model)
    losses = [fsdp_ranks.train_step(model, optimizer, ids) for ids in fsdp_ranks.batches()]
    return {"losses": losses, "final": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _single_process_bf16(folder) -> list[float]:
    from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
    from modeling_deepseek_v4.fsdp_support import freeze_untrained_parameters

    model = DeepseekV4ExtForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).train()
    freeze_untrained_parameters(model)
    optimizer = fsdp_ranks.optimizer_for(model)
    return [fsdp_ranks.train_step(model, optimizer, ids) for ids in fsdp_ranks.batches()]


@pytest.fixture(scope="module")
def reference(runs):
    return {
        "full": _single_process(lora=False),
        "lora": _single_process(lora=True),
        "bf16": _single_process_bf16(runs["init"]),
    }


def _result(runs, name: str) -> dict:
    result = runs[name]
    assert "error" not in result, f"{name} failed on the ranks:\n{result.get('error')}"
    return result


def _assert_same_state(got: dict, expected: dict, tol: float) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        if tensor.is_floating_point():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
        else:  # tid2eid: exact
            assert torch.equal(got[name], tensor), name


def test_no_split_modules_name_the_decoder_layer():
    """accelerate's `transformer_based_wrap` wraps `_no_split_modules`; the MTP block is a decoder-layer subclass."""
    from modeling_deepseek_v4.decoder_layer import DeepseekV4DecoderLayer, DeepseekV4MTPLayer

    model = fsdp_ranks.build_model(0)
    assert set(model._no_split_modules) == {"DeepseekV4DecoderLayer"}  # the instance holds a set
    assert issubclass(DeepseekV4MTPLayer, DeepseekV4DecoderLayer)
    # Everything a layer computes with lives inside it: an FSDP unit gathers exactly what its forward reads.
    assert {type(m).__name__ for m in model.modules()} >= {"DeepseekV4DecoderLayer", "DeepseekV4MTPLayer"}


def test_untrained_parameters_are_the_indexer_and_mtp():
    from modeling_deepseek_v4.fsdp_support import untrained_parameter_names
    from tests.conftest import tiny_model

    model = tiny_model()
    names = untrained_parameter_names(model)
    assert names and all(".indexer." in f".{n}" or n.startswith("model.mtp.") for n in names)
    assert any(n.startswith("model.mtp.") for n in names) and any(".indexer." in n for n in names)
    model = tiny_model(mtp_loss_weight=0.3, indexer_loss_weight=0.1)
    assert untrained_parameter_names(model) == []


@pytest.mark.parametrize("name", ["accelerate_full", "accelerate_lora", "transformers"])
def test_decoder_layers_are_fsdp_units_and_buffers_stay_whole(runs, name):
    layout = _result(runs, name)["layout"]
    prefix = "base_model.model." if name == "accelerate_lora" else ""
    units = {u.removeprefix(prefix) for u in layout["units"]}
    assert {f"model.layers.{i}" for i in range(5)} | {"model.mtp.0", "lm_head"} <= units
    for tensor_name, (kind, placements) in layout["tensors"].items():
        if tensor_name.endswith(("e_score_correction_bias", "tid2eid")):
            assert kind == "Tensor", tensor_name  # buffers are replicated, never sharded
        elif tensor_name.endswith(("attn_hc.fn", "ffn_hc.base", "hc_head.hc_fn", "experts.gate_up_proj")):
            assert kind == "DTensor" and placements == ("shard0",), (tensor_name, kind, placements)


def test_accelerate_fsdp2_full_finetuning_matches_single_process(runs, reference):
    result, ref = _result(runs, "accelerate_full"), reference["full"]
    torch.testing.assert_close(result["losses"], ref["losses"], rtol=0, atol=LOSS_TOL)
    _assert_same_state(result["final"], ref["final"], WEIGHT_TOL)


def test_accelerate_fsdp2_lora_matches_single_process(runs, reference):
    result, ref = _result(runs, "accelerate_lora"), reference["lora"]
    torch.testing.assert_close(result["losses"], ref["losses"], rtol=0, atol=LOSS_TOL)
    assert ref["losses"][0] != ref["losses"][-1]  # the adapters train
    _assert_same_state(result["final"], ref["final"], WEIGHT_TOL)
    lora = [k for k in ref["final"] if "lora_" in k]
    assert any(".experts.lora_A." in k for k in lora) and any(".o_a_proj.lora_B." in k for k in lora)


@pytest.mark.parametrize("name", ["accelerate_full", "accelerate_lora", "transformers"])
def test_sharded_checkpoint_resumes_to_the_same_losses(runs, name):
    """accelerate: `save_state` / `load_state` into a model of other weights and router buffers; transformers:
    `from_pretrained(<distributed checkpoint>)` + `fsdp_support.load_sharded_state` (optimizer)."""
    result = _result(runs, name)
    continued = result["losses"][fsdp_ranks.SAVE_AFTER :]
    torch.testing.assert_close(result["resumed"], continued, rtol=0, atol=RESUME_TOL)


def test_transformers_distributed_config_matches_single_process(runs, reference):
    result, ref = _result(runs, "transformers"), reference["full"]
    torch.testing.assert_close(result["losses"], ref["losses"], rtol=0, atol=LOSS_TOL)
    _assert_same_state(result["final"], ref["final"], WEIGHT_TOL)


def test_transformers_distributed_checkpoint_round_trips(runs):
    """`save_pretrained(distributed_checkpoint=True)` writes rank-local shards that `from_pretrained` with the same
    `DistributedConfig` reads back exactly, buffers included."""
    result = _result(runs, "transformers")
    assert "config.json" in result["files"] and any(f.endswith(".safetensors") for f in result["files"])
    _assert_same_state(result["reloaded"], result["saved"], 0.0)


def test_distributed_checkpoint_folder_carries_the_plugin_code(runs):
    """FSDP2 swaps the class for a generated one whose module is torch's: the folder still gets the plugin's code."""
    files = _result(runs, "transformers")["files"]
    assert "modeling_deepseek_v4.py" in files and not any(f.startswith("_fsdp_") for f in files)


def test_transformers_bf16_with_fp32_islands_matches_single_process(runs, reference):
    """FSDP2 refuses a unit of mixed dtypes; the plugin's plan splits the units that would mix (attention `sinks` in
    fp32 next to bf16 projections, the fp32 final norm next to the bf16 head): bf16 training runs and follows one
    process (bf16 tolerance: the ranks reduce bf16 gradients in another order)."""
    result = _result(runs, "transformers_bf16")
    assert result["dtypes"]["model.layers.0.self_attn.sinks"] == torch.float32
    assert result["dtypes"]["model.layers.0.self_attn.q_b_proj.weight"] == torch.bfloat16
    assert "model.layers.0.self_attn" in result["layout"]["units"]
    # observed: step 1 (same weights) 5e-7, steps 2-3 5e-4 / 2e-4 (bf16 gradients summed in another order)
    assert result["losses"][0] == pytest.approx(reference["bf16"][0], abs=1e-5)
    torch.testing.assert_close(result["losses"], reference["bf16"], rtol=0, atol=1e-2)
