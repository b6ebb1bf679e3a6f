"""Pipeline parallelism at inference (pipeline_support.py): 2 gloo ranks on CPU load a saved tiny Flash-like model
(hash-routed layers 0-3, so the second stage has a hash layer too; CSA and HCA layers; an MTP block) with
`DistributedConfig(pp_size=2)`. Each rank holds only its own layers (the others are transformers'
`PipelineIdentityLayer`), the first stage the embedding, the last `hc_head`, `norm`, the MTP block and `lm_head`,
and no checkpoint key is reported missing or unexpected. The logits (fp32, atol 1e-5) and greedy `generate` with the
cache (left-padded prompts of 160 tokens, 8 new tokens) equal one process on both ranks. Training raises
`NotImplementedError` (the engine's schedule has no backward across stages). PP with TP inside each stage
(`pp_size=2, tp_size=2`, 4 ranks): each rank shards only its own stage's modules (transformers resolves the TP plan for
the whole model before the split), and logits and greedy `generate` still equal one process.

One spawn runs every check (process start-up and imports dominate on 2 cores); each test reads its result."""

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
NUM_LAYERS = 5
OVERRIDES = dict(num_hash_layers=4)


def _worker(rank: int, port: int, folder: str, out: str) -> None:
    result = {}
    with process_group(rank, WORLD, port, timeout_s=60):
        try:
            from transformers.distributed import DistributedConfig
            from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

            from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM

            model, info = DeepseekV4ExtForCausalLM.from_pretrained(
                folder, distributed_config=DistributedConfig(pp_size=2), output_loading_info=True
            )
            model.eval()
            base = model.model
            result["info"] = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys")}
            result["real_layers"] = [
                i for i, layer in enumerate(base.layers) if not isinstance(layer, PipelineIdentityLayer)
            ]
            result["identity"] = {
                name: isinstance(getattr(model if name == "lm_head" else base, name), PipelineIdentityLayer)
                for name in ("embed_tokens", "norm", "hc_head", "lm_head")
            }
            result["mtp_blocks"] = len(base.mtp)
            result["hash_layers"] = [i for i in result["real_layers"] if base.layers[i].mlp.is_hash]
            with torch.no_grad():
                result["logits"] = model(**_inputs(), use_cache=False).logits
                result["logits_keep_1"] = model(**_inputs(), use_cache=False, logits_to_keep=1).logits
            result["generated"] = _generate(model)
            model.save_pretrained(f"{out}/saved", is_main_process=rank == 0)  # every rank joins; rank 0 writes
            inputs = _inputs()
            try:  # raises on every rank before any communication
                model.train()(**inputs, labels=inputs["input_ids"], use_cache=False)
                result["training"] = "no error"
            except NotImplementedError as error:
                result["training"] = str(error)
            try:  # the MTP block drafts from the final streams, which only the last stage has: refused everywhere
                ids = _prompt()["input_ids"][:1, -40:]
                model.eval().generate(ids, max_new_tokens=2, do_sample=False, use_mtp=True, pad_token_id=0)
                result["mtp"] = "no error"
            except NotImplementedError as error:
                result["mtp"] = str(error)
        except Exception as error:  # reported to the test
            result = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
    torch.save(result, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process reference logits / tokens and both ranks' results."""
    from tests.conftest import tiny_model

    root = tmp_path_factory.mktemp("pp")
    model = tiny_model("flash", **OVERRIDES)
    assert len(model.model.layers) == NUM_LAYERS and len(model.model.mtp) == 1
    model.save_pretrained(root / "model")
    with torch.no_grad():
        reference = {"logits": model(**_inputs(), use_cache=False).logits, "state": model.state_dict()}
    reference["saved"] = root / "saved"
    reference["generated"] = _generate(model)
    results = fork_ranks(_worker, WORLD, str(root / "model"), out=root)
    # every rank's trace: a rank that failed first leaves its peer a "connection closed" error
    errors = [f"rank {rank}: {result['trace']}" for rank, result in enumerate(results) if "error" in result]
    assert not errors, "\n".join(errors)
    return reference, results


def test_each_stage_holds_only_its_layers(runs):
    _, (first, last) = runs
    # transformers' even split (5.24: [0, 3) + [3, 5); 5.23: [0, 2) + [2, 5)): contiguous, disjoint, complete
    assert first["real_layers"][0] == 0 and last["real_layers"][-1] == NUM_LAYERS - 1
    assert first["real_layers"] + last["real_layers"] == list(range(NUM_LAYERS))
    assert len(first["real_layers"]) >= 2 and len(last["real_layers"]) >= 2
    assert 3 in last["hash_layers"]  # the second stage routes by token id too: it needs `input_ids`
    assert first["identity"] == {"embed_tokens": False, "norm": True, "hc_head": True, "lm_head": True}
    assert last["identity"] == {"embed_tokens": True, "norm": False, "hc_head": False, "lm_head": False}
    assert (first["mtp_blocks"], last["mtp_blocks"]) == (0, 1)
    for result in (first, last):  # other stages' keys (hc_head, MTP included) are skipped, not unexpected
        assert result["info"] == {"missing_keys": [], "unexpected_keys": []}


def test_logits_match_single_process(runs):
    reference, results = runs
    for result in results:
        torch.testing.assert_close(result["logits"], reference["logits"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(result["logits_keep_1"], reference["logits"][:, -1:], atol=ATOL, rtol=RTOL)


def test_generate_with_cache_matches_single_process(runs):
    """Prefill of 160 left-padded tokens, then 8 decode steps, each stage caching its own layers."""
    reference, results = runs
    assert reference["generated"].shape == (2, 168)
    for result in results:
        assert torch.equal(result["generated"], reference["generated"])


def test_training_is_refused(runs):
    _, results = runs
    for result in results:
        assert "not supported under pipeline parallelism" in result["training"], result["training"]


def test_mtp_speculation_is_refused_on_every_stage(runs):
    _, results = runs
    for result in results:
        assert "use_mtp=True is not supported under pipeline parallelism" in result["mtp"], result["mtp"]


def _pp_tp_worker(rank: int, port: int, folder: str, out: str) -> None:
    result = {}
    with process_group(rank, 4, port, timeout_s=120):
        try:
            from torch.distributed.tensor import DTensor
            from transformers.distributed import DistributedConfig
            from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

            from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM

            config = DistributedConfig(pp_size=2, tp_size=2)
            model = DeepseekV4ExtForCausalLM.from_pretrained(folder, distributed_config=config).eval()
            layers = [layer for layer in model.model.layers if not isinstance(layer, PipelineIdentityLayer)]
            weight = layers[0].self_attn.q_b_proj.weight
            result["q_b_proj"] = (isinstance(weight, DTensor), tuple(weight.to_local().shape), tuple(weight.shape))
            with torch.no_grad():
                result["logits"] = model(**_inputs(), use_cache=False).logits
            result["generated"] = _generate(model)
            model.save_pretrained(f"{out}/saved_pp_tp", is_main_process=rank == 0)
        except Exception as error:  # reported to the test
            result = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
    torch.save(result, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("storage", ["dense", "fp8_fp4"])
def test_pipeline_with_tensor_parallel_stages_matches_single_process(tmp_path, storage):
    """4 ranks: 2 stages x 2 TP ranks; every rank gets the one-process logits and tokens, also with the weights kept
    like the official files (FP8 linears, FP4 experts: each stage shards only its own quantized buffers)."""
    from tests.conftest import tiny_model
    from tests.distributed.test_tensor_expert_parallel import QUANTIZED

    model = tiny_model("flash", **OVERRIDES, **(QUANTIZED if storage == "fp8_fp4" else {}))
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        logits = model(**_inputs(), use_cache=False).logits
    generated = _generate(model)
    results = fork_ranks(_pp_tp_worker, 4, str(tmp_path / "model"), out=tmp_path)
    errors = [f"rank {rank}: {result['trace']}" for rank, result in enumerate(results) if "error" in result]
    assert not errors, "\n".join(errors)
    for result in results:
        is_sharded, local, full = result["q_b_proj"]
        assert is_sharded and local[0] * 2 == full[0]  # this stage's heads split over its 2 TP ranks
        torch.testing.assert_close(result["logits"], logits, atol=ATOL, rtol=RTOL)
        assert torch.equal(result["generated"], generated)
    assert_saved_whole(tmp_path / "saved_pp_tp", model.state_dict())


def assert_saved_whole(folder, expected: dict) -> None:
    """The folder `save_pretrained` wrote from the ranks holds every tensor of the model, byte for byte."""
    from safetensors.torch import load_file

    saved = {}
    for shard in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(shard))
    assert sorted(saved) == sorted(expected)
    for key, tensor in saved.items():
        assert torch.equal(tensor, expected[key]), key


def test_save_from_the_stages_writes_the_whole_model(runs):
    """Each stage holds only its layers; the folder saved from both ranks holds all of them (and the MTP block, the
    embedding, `hc_head` and the head), and loads in one process with the same logits."""
    from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM

    reference, _ = runs
    assert_saved_whole(reference["saved"], reference["state"])
    model = DeepseekV4ExtForCausalLM.from_pretrained(reference["saved"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs(), use_cache=False).logits, reference["logits"], atol=0, rtol=0)
