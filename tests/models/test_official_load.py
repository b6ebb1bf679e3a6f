"""`from_pretrained(<official folder>)` loads DeepSeek's own layout directly (official_loader.py): FP8 / FP4 kept by
default, exact bf16 / fp32 dequantization on request, the MTP block or the `-0731` DSpark drafter kept, device maps
with disk offload, the tokenizer files riding along, and the opt-in routing of `model_type: deepseek_v4`.

The synthetic checkpoints (tests/conversion/official_synth.py) are written from the spec tables independently of
the package's mapping code, with experts and scales straddling shards."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from accelerate.utils import compute_module_sizes
from transformers import AutoTokenizer

from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM, DeepseekV4ExtModel
from modeling_deepseek_v4.checkpoint_reader import CheckpointError
from modeling_deepseek_v4.conversion import convert_official_to_plugin
from tests.conftest import tiny_config, tiny_model
from tests.conversion.official_synth import drop_tensor, make_official_checkpoint, rename_tensor

GENERATE = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return make_official_checkpoint(tmp_path_factory.mktemp("official") / "DeepSeek-V4-Flash", tiny_config())


@pytest.fixture(scope="module")
def prompt():
    # Long enough for several CSA entries beyond index_topk (the indexer really selects) and HCA entries.
    return torch.randint(1, 97, (1, 120), generator=torch.Generator().manual_seed(0))


def reference_model(official, dtype: torch.dtype) -> DeepseekV4ExtForCausalLM:
    """The model built from the spec's exact dequantization (`official.reference`, fp32) in `dtype`."""
    # Built in `dtype` as transformers does: the fp32 islands (norms, mHC, sinks, compressor projections) stay fp32.
    model = DeepseekV4ExtForCausalLM._from_config(DeepseekV4ExtConfig.from_dict(official.config), dtype=dtype)
    model.load_state_dict(official.reference, strict=True)
    return model.eval()


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t


def test_dtype_bf16_and_fp32_are_the_exact_dequantization(official, prompt):
    for dtype in (torch.float32, torch.bfloat16):
        model = DeepseekV4ExtForCausalLM.from_pretrained(official.folder, dtype=dtype)
        state = model.state_dict()
        assert set(state) == set(official.reference)  # MTP block included
        for name, ref in official.reference.items():
            assert torch.equal(state[name].float(), ref.float()), name
        reference = reference_model(official, dtype)
        for name, tensor in reference.state_dict().items():
            assert state[name].dtype == tensor.dtype, name  # fp32 islands (norms, mHC, sinks) stay fp32
        with torch.no_grad():
            assert torch.equal(model(prompt).logits, reference(prompt).logits)


def test_default_keeps_fp8_and_fp4_resident_with_the_dequantized_logits(official, prompt, tmp_path):
    model = DeepseekV4ExtForCausalLM.from_pretrained(official.folder)
    layout = model.config.dsv4_quantization
    assert layout["weights"] == "fp8" and layout["experts"] == "fp4"
    state = model.state_dict()
    assert state["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    assert state["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.int8  # packed FP4
    # Byte for byte what `dsv4-convert to-hf --dtype keep` writes.
    convert_official_to_plugin(official.folder, tmp_path / "keep", dtype="keep", progress=False)
    converted = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "keep").state_dict()
    assert set(state) == set(converted)
    for name, tensor in converted.items():
        assert state[name].dtype == tensor.dtype and torch.equal(raw_bytes(state[name]), raw_bytes(tensor)), name
    # The quantized modules compute with exactly the dequantized weights.
    bf16 = DeepseekV4ExtForCausalLM.from_pretrained(official.folder, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, bf16(prompt).logits)
    assert model.generate(prompt, **GENERATE).tolist() == bf16.generate(prompt, **GENERATE).tolist()


def test_base_model_class_loads_without_the_head(official):
    model = DeepseekV4ExtModel.from_pretrained(official.folder, dtype=torch.float32)
    state = model.state_dict()
    assert "lm_head.weight" not in state and "embed_tokens.weight" in state
    assert torch.equal(
        state["layers.1.self_attn.q_a_proj.weight"], official.reference["model.layers.1.self_attn.q_a_proj.weight"]
    )


def test_dspark_release_loads_with_its_drafter(tmp_path):
    ckpt = make_official_checkpoint(tmp_path / "DeepSeek-V4-Flash-0731", tiny_config(), dspark=True)
    model = DeepseekV4ExtForCausalLM.from_pretrained(ckpt.folder, dtype=torch.float32)
    assert model.config.dspark_num_stages == 3 and model.model.dspark is not None
    state = model.state_dict()
    assert set(state) == set(ckpt.reference)
    for name, ref in ckpt.reference.items():
        assert torch.equal(state[name], ref.float()), name
    kept = DeepseekV4ExtForCausalLM.from_pretrained(ckpt.folder)
    assert kept.state_dict()["model.dspark.main_proj.weight"].dtype == torch.float8_e4m3fn


def test_checkpoint_that_does_not_match_raises(tmp_path):
    config = tiny_config()
    ckpt = make_official_checkpoint(tmp_path / "missing", config, n_shards=2)
    drop_tensor(ckpt.folder, "layers.1.attn_norm.weight")
    with pytest.raises(CheckpointError, match=r"lacks tensors for \['model.layers.1.input_layernorm.weight'\]"):
        DeepseekV4ExtForCausalLM.from_pretrained(ckpt.folder)
    ckpt = make_official_checkpoint(tmp_path / "unknown", config, n_shards=2)
    rename_tensor(ckpt.folder, "layers.0.attn_norm.weight", "layers.0.attn_nrm.weight")
    with pytest.raises(CheckpointError, match="unknown tensor 'layers.0.attn_nrm.weight'"):
        DeepseekV4ExtForCausalLM.from_pretrained(ckpt.folder, dtype=torch.bfloat16)
    ckpt = make_official_checkpoint(tmp_path / "shape", config, n_shards=2)
    raw = json.loads((ckpt.folder / "config.json").read_text())
    (ckpt.folder / "config.json").write_text(json.dumps({**raw, "q_lora_rank": 48}))
    with pytest.raises(CheckpointError, match="has shape"):
        DeepseekV4ExtForCausalLM.from_pretrained(ckpt.folder)


def test_options_that_need_a_converted_folder_are_refused(official):
    with pytest.raises(TypeError, match="dsv4-convert to-hf"):
        DeepseekV4ExtForCausalLM.from_pretrained(official.folder, quantization_config={"load_in_4bit": True})
    with pytest.raises(ValueError, match="torch.bfloat16 / torch.float32"):
        DeepseekV4ExtForCausalLM.from_pretrained(official.folder, dtype=torch.float16)
    with pytest.raises(ValueError, match="config= cannot be combined"):
        DeepseekV4ExtForCausalLM.from_pretrained(official.folder, config=tiny_config())
    with pytest.raises(ValueError, match="offload_folder"):
        DeepseekV4ExtForCausalLM.from_pretrained(official.folder, device_map="auto", max_memory={"cpu": 10**5})
    # Runtime settings override the config as in transformers.
    model = DeepseekV4ExtForCausalLM.from_pretrained(official.folder, use_cache=False, index_topk=2)
    assert model.config.use_cache is False and model.config.index_topk == 2


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("offload_buffers", [False, True])
def test_device_map_with_disk_offload_matches_in_memory(official, prompt, tmp_path, dtype, offload_buffers):
    in_memory = DeepseekV4ExtForCausalLM.from_pretrained(official.folder, dtype=dtype)
    with torch.no_grad():
        logits = in_memory(prompt).logits
    tokens = in_memory.generate(prompt, **GENERATE)
    model = DeepseekV4ExtForCausalLM.from_pretrained(
        official.folder,
        dtype=dtype,
        device_map="auto",
        max_memory={"cpu": compute_module_sizes(in_memory)[""] // 2, "disk": 10**9},
        offload_folder=tmp_path / "offload",
        offload_buffers=offload_buffers,
    )
    disk = [name for name, device in model.hf_device_map.items() if device == "disk"]
    assert disk and "cpu" in model.hf_device_map.values(), model.hf_device_map
    for name in disk:  # waits on meta until its module's forward loads it
        module = model.get_submodule(name)
        assert all(p.is_meta for p in module.parameters()), name
        assert all(b.is_meta == offload_buffers for b in module.buffers()), name
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, logits)
    assert model.generate(prompt, **GENERATE).tolist() == tokens.tolist()


def test_tokenizer_and_chat_template_ride_along(prompt, tmp_path):
    # Official compression rates, so that AutoTokenizer's look at config.json (native's config class) succeeds.
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    config = tiny_config(compress_rates=rates, compress_ratios=[0, 0, 4, 128, 4, 0])
    official = make_official_checkpoint(tmp_path / "DeepSeek-V4-Flash", config)
    tokenizer = AutoTokenizer.from_pretrained(official.folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<assistant>")
    model = DeepseekV4ExtForCausalLM.from_pretrained(official.folder)
    assert (
        model.generation_config.bos_token_id
        == json.loads((official.folder / "generation_config.json").read_text())["bos_token_id"]
    )
    model.save_pretrained(tmp_path / "saved")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "encoding"):
        assert (tmp_path / "saved" / name).exists(), name
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "saved").apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        == text
    )
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "deepseek_v4_ext" and saved["architectures"] == ["DeepseekV4ExtForCausalLM"]
    reloaded = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded(prompt).logits, model(prompt).logits)


def test_folder_saved_by_native_transformers_loads_directly(tmp_path, prompt):
    """transformers' native class writes official names back under `model.` (hf-integration.md §3), no MTP."""
    from tests.models.test_native_parity import NATIVE, native_from

    if NATIVE is None:
        pytest.skip("this transformers has no native deepseek_v4")
    ours = tiny_model()
    native_from(ours).save_pretrained(tmp_path / "native")
    model = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32)
    assert model.config.num_nextn_predict_layers == 0
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, ours(prompt).logits)


def test_hub_repo_id_downloads_weights_and_tokenizer_files(official, monkeypatch):
    import huggingface_hub
    import transformers.utils

    asked = {}

    def cached_file(repo, filename, **kwargs):
        assert repo == "deepseek-ai/DeepSeek-V4-Flash" and kwargs.get("revision") == "main"
        return str(official.folder / filename)

    def snapshot_download(repo, allow_patterns=None, **kwargs):
        asked.update(repo=repo, patterns=allow_patterns, **kwargs)
        return str(official.folder)

    monkeypatch.setattr(transformers.utils, "cached_file", cached_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = DeepseekV4ExtForCausalLM.from_pretrained("deepseek-ai/DeepSeek-V4-Flash", revision="main")
    assert asked["repo"] == "deepseek-ai/DeepSeek-V4-Flash" and asked["revision"] == "main"
    for pattern in ("*.safetensors", "*.json", "*.jinja", "encoding/*"):
        assert pattern in asked["patterns"]
    assert model.name_or_path == "deepseek-ai/DeepSeek-V4-Flash"


ROUTING = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    import modeling_deepseek_v4

    folder = sys.argv[1]
    modeling_deepseek_v4.route_official_checkpoints()
    config = AutoConfig.from_pretrained(folder)
    assert type(config).__name__ == "DeepseekV4OfficialConfig", type(config)
    assert getattr(config, "quantization_config", None) is None  # never handed to transformers' FP8 quantizer
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is modeling_deepseek_v4.DeepseekV4ExtForCausalLM, type(model)
    assert model.config.dsv4_quantization["experts"] == "fp4" and model.config.num_nextn_predict_layers == 1
    assert type(AutoModel.from_pretrained(folder, dtype=torch.bfloat16)) is modeling_deepseek_v4.DeepseekV4ExtModel
    ids = torch.randint(1, 97, (1, 40))
    direct = modeling_deepseek_v4.DeepseekV4ExtForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    print("routed")
    """
)


def test_opt_in_routes_deepseek_v4_through_the_auto_classes(official):
    # In a child process: the routing is process-wide, and the other tests check that importing never routes.
    run = subprocess.run(
        [sys.executable, "-c", ROUTING, str(official.folder)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("routed"), run.stderr[-3000:]


def test_importing_the_package_does_not_route_deepseek_v4():
    from transformers import CONFIG_MAPPING

    assert CONFIG_MAPPING["deepseek_v4"].__module__.startswith("transformers.models.deepseek_v4")


MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
    from modeling_deepseek_v4.official_layout import plan_official
    from tests.rss import peak_rss

    dtype = {"keep": None, "bf16": torch.bfloat16}[sys.argv[2]]
    plan_official(sys.argv[1], sys.argv[2])  # imports and plans from the headers: the baseline is the data path
    model, base, peak = peak_rss(lambda: DeepseekV4ExtForCausalLM.from_pretrained(sys.argv[1], dtype=dtype))
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"base": base, "peak": peak, "model": size}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["keep", "bf16"])
def test_direct_load_peaks_at_about_one_shard_above_the_model(tmp_path, mode):
    # A 50k vocabulary makes embed / head ~50 MB each: a checkpoint of several ~50 MB shards.
    ckpt = make_official_checkpoint(tmp_path / "official", tiny_config(vocab_size=50_000, hidden_size=512), n_shards=4)
    largest = max(p.stat().st_size for p in ckpt.shards)
    assert largest > 40e6 and len(ckpt.shards) >= 3
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(ckpt.folder), mode], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    usage = json.loads(run.stdout.strip().splitlines()[-1])
    above_model = usage["peak"] - usage["base"] - usage["model"]
    mb = {"model": usage["model"] / 1e6, "above": above_model / 1e6, "shard": largest / 1e6}
    print(f"{mode}: model {mb['model']:.1f} MB, peak above it {mb['above']:.1f} MB, shard {mb['shard']:.1f} MB")
    assert above_model < largest
