"""accelerate offload: `device_map="auto"` with disk offload, `cpu_offload` and `init_empty_weights` +
`load_checkpoint_and_dispatch` give the in-memory model's greedy tokens and logits, dense and kept quantized
(hf-integration.md §12). accelerate loads a module's offloaded tensors only around that module's `forward`, so these
fail with "Tensor on device meta is not on the expected device cpu!" as soon as a tensor is read elsewhere."""

from dataclasses import dataclass
from pathlib import Path

import accelerate
import pytest
import torch
from accelerate.utils import compute_module_sizes, send_to_device
from transformers import AutoModelForCausalLM

from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM
from modeling_deepseek_v4.batch_meta import BatchMeta
from modeling_deepseek_v4.quantization import quantize_model
from modeling_deepseek_v4.rope import RopeTables
from tests.conftest import tiny_config, tiny_model

GENERATE = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
DISK = 10**9


@dataclass
class Saved:
    """A saved tiny model and what the in-memory copy computes for `prompt [1, 100]`."""

    folder: Path
    prompt: torch.Tensor
    tokens: torch.Tensor
    logits: torch.Tensor
    # Half the model's bytes: the embedding and the first layers stay in memory, the rest goes to disk.
    cpu_budget: int


@pytest.fixture(scope="module", params=["dense", "fp8-fp4"])
def saved(request, tmp_path_factory) -> Saved:
    model = tiny_model()
    if request.param == "fp8-fp4":
        # Kept quantized: FP8 linears and FP4 experts are buffers (quantized_modules.py), so they must offload too.
        quantize_model(model, weights="fp8", experts="fp4")
    folder = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.randint(1, 97, (1, 100), generator=torch.Generator().manual_seed(0))
    tokens, logits = run(reference, prompt)
    return Saved(folder, prompt, tokens, logits, compute_module_sizes(reference)[""] // 2)


def run(model, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens `[1, 100 + 8]` and the prompt's logits `[1, 100, V]`."""
    with torch.no_grad():
        return model.generate(prompt, **GENERATE), model(prompt).logits


def assert_same_as_in_memory(model, saved: Saved) -> None:
    tokens, logits = run(model, saved.prompt)
    assert tokens.tolist() == saved.tokens.tolist()
    torch.testing.assert_close(logits, saved.logits, atol=1e-5, rtol=0)
    # The static cache's decode step (`meta.static`) takes its own path through the compressors.
    static = model.generate(saved.prompt, cache_implementation="static", **GENERATE)
    assert static.tolist() == saved.tokens.tolist()


def assert_disk_modules_are_meta(model, with_buffers: bool) -> None:
    """Everything mapped to "disk" (and some of it is) waits on meta until its module's forward loads it."""
    disk = [name for name, device in model.hf_device_map.items() if device == "disk"]
    assert disk and "cpu" in model.hf_device_map.values(), model.hf_device_map
    for name in disk:
        module = model.get_submodule(name)
        tensors = [*module.parameters(), *(module.buffers() if with_buffers else ())]
        assert tensors and all(t.is_meta for t in tensors), name


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_device_map_auto_with_disk_offload(saved, tmp_path, offload_buffers):
    # On a CPU-only machine "cpu" is the execution device; what does not fit its budget goes to "disk".
    model = AutoModelForCausalLM.from_pretrained(
        saved.folder,
        dtype=torch.float32,
        device_map="auto",
        max_memory={"cpu": saved.cpu_budget, "disk": DISK},
        offload_folder=tmp_path / "offload",
        # The kept-quantized weights are buffers: with False they stay resident, with True they go to disk as well.
        offload_buffers=offload_buffers,
    ).eval()
    assert_disk_modules_are_meta(model, with_buffers=offload_buffers)
    assert_same_as_in_memory(model, saved)


def test_cpu_offload(saved):
    model = AutoModelForCausalLM.from_pretrained(saved.folder, dtype=torch.float32).eval()
    # offload_buffers: the router tables and the quantized weights are buffers; they are loaded per forward too.
    accelerate.cpu_offload(model, execution_device="cpu", offload_buffers=True)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert_same_as_in_memory(model, saved)


def test_init_empty_weights_and_load_checkpoint_and_dispatch(saved, tmp_path):
    config = DeepseekV4ExtConfig.from_pretrained(saved.folder)
    # include_buffers: a kept-quantized model's weights are buffers, which should not be allocated either.
    with accelerate.init_empty_weights(include_buffers=True):
        model = DeepseekV4ExtForCausalLM(config)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    # device_map="auto" would balance `max_memory` over accelerators first, and that step rejects a "disk" entry.
    device_map = accelerate.infer_auto_device_map(
        model,
        max_memory={"cpu": saved.cpu_budget, "disk": DISK},
        no_split_module_classes=list(model._no_split_modules),
    )
    model = accelerate.load_checkpoint_and_dispatch(
        model,
        str(saved.folder),
        device_map=device_map,
        offload_folder=str(tmp_path / "offload"),
        # accelerate 1.15 neither loads nor offloads the buffers of a "disk" module when this is False: the router's
        # `e_score_correction_bias` would silently keep its initial value (`load_checkpoint_in_model`).
        offload_buffers=True,
    ).eval()
    assert_disk_modules_are_meta(model, with_buffers=True)
    assert_same_as_in_memory(model, saved)


def test_whole_blocks_loaded_by_their_forward(saved, tmp_path):
    """Block-granular offload (`preload_module_classes`: a block's whole subtree is loaded around the block's own
    forward, like FSDP units) covers the MTP block too: MTP speculation and `mtp_logits` run through its forward."""
    reference = AutoModelForCausalLM.from_pretrained(saved.folder, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(saved.folder, dtype=torch.float32).eval()
    # The embedding stays in memory: assisted decoding moves its candidates to `model.device` (the first parameter's).
    resident = {name: "cpu" for name in ("model.embed_tokens", "model.norm", "model.hc_head", "lm_head")}
    accelerate.dispatch_model(
        model,
        {**resident, "model.layers": "disk", "model.mtp": "disk"},
        offload_dir=tmp_path / "offload",
        offload_buffers=True,
        preload_module_classes=["DeepseekV4DecoderLayer", "DeepseekV4MTPLayer"],
    )
    assert_disk_modules_are_meta(model, with_buffers=True)
    with torch.no_grad():
        assert model.generate(saved.prompt, use_mtp=True, **GENERATE).tolist() == saved.tokens.tolist()
        torch.testing.assert_close(
            model.mtp_logits(saved.prompt), reference.mtp_logits(saved.prompt), atol=1e-5, rtol=0
        )


def test_batch_meta_follows_the_hidden_states_across_devices():
    """accelerate's device hooks move each forward argument that has a `.to` to the module's execution device; the
    positions and cos/sin of a call must move with the hidden states ("meta" stands in for a second device)."""
    cfg = tiny_config()
    tables = RopeTables(cfg.rope_parameters, cfg.qk_rope_head_dim)
    meta = BatchMeta(torch.tensor([0, 5]), torch.tensor([3, 2]), 3, tables)
    assert send_to_device(meta, "cpu") is meta
    moved = send_to_device({"meta": meta}, "meta")["meta"]
    assert isinstance(moved, BatchMeta) and moved.tables is tables and moved.static == meta.static
    for name in ("start", "lengths", "positions"):
        assert getattr(moved, name).is_meta and getattr(moved, name).shape == getattr(meta, name).shape, name
    for name, (cos, sin) in moved.rope.items():
        assert cos.is_meta and sin.is_meta and cos.shape == (2, 3, cfg.qk_rope_head_dim // 2), name
    assert meta.start.device.type == "cpu"
