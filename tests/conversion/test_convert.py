"""Official <-> plugin conversion on synthetic official checkpoints (official-format.md §6-§12).

The synthetic writer (`official_synth.py`) is written from the spec independently of `conversion/`, and returns the
exactly dequantized reference in plugin naming, so these tests check the converter against the spec.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
from modeling_deepseek_v4.conversion import (
    ConversionError,
    convert_official_to_plugin,
    convert_plugin_to_official,
    transcode_experts_to_fp8,
    verify_folder,
)
from modeling_deepseek_v4.conversion.checkpoint import ConversionInterrupted, ShardedWriter, temp_dir_for
from modeling_deepseek_v4.conversion.cli import main as cli
from modeling_deepseek_v4.quant_formats import quantize_fp4
from tests.conftest import tiny_config
from tests.conversion.official_synth import (
    corrupt_header,
    drop_tensor,
    make_official_checkpoint,
    rename_tensor,
    truncate_file,
)

SHARD = 60_000  # small output shards so that every test writes several


def load_all(folder):
    tensors = {}
    for path in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() == 1 else torch.equal(a, b)


@pytest.fixture
def official(tmp_path, schedule):
    return make_official_checkpoint(tmp_path / "official", tiny_config(schedule), n_shards=3)


def test_fp32_conversion_equals_direct_dequantization(tmp_path, official):
    convert_official_to_plugin(official.folder, tmp_path / "hf", dtype="fp32", shard_size=SHARD, progress=False)
    model = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "hf").eval()
    state = model.state_dict()
    assert set(official.reference) == set(state)
    for name, ref in official.reference.items():
        assert torch.equal(state[name], ref.to(state[name].dtype)), name
    direct = DeepseekV4ExtForCausalLM(model.config).eval()
    direct.load_state_dict(official.reference, strict=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        a, b = model(ids, use_cache=False).logits, direct(ids, use_cache=False).logits
    # Weights are bit-identical (above); logits may differ in the last ulp because BLAS picks kernels by the
    # memory layout of the loaded tensors.
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    info = json.loads((tmp_path / "hf" / "dsv4_conversion.json").read_text())
    assert info["direction"] == "official->plugin" and info["dtype"] == "fp32"
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    assert verify_folder(tmp_path / "hf", official.folder)["sampled_equal"]


@pytest.mark.parametrize("dtype", ["bf16", "keep"])
def test_official_round_trip_is_bit_identical(tmp_path, official, dtype):
    convert_official_to_plugin(official.folder, tmp_path / "hf", dtype=dtype, shard_size=SHARD, progress=False)
    convert_plugin_to_official(tmp_path / "hf", tmp_path / "back", progress=False)
    original, back = load_all(official.folder), load_all(tmp_path / "back")
    assert set(original) == set(back)
    for name in original:
        assert same_bits(original[name], back[name]), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v4" and config["expert_dtype"] == "fp4"
    assert len(config["compress_ratios"]) == config["num_hidden_layers"] + 1


def test_bf16_conversion_is_exact_and_loads(tmp_path, official):
    convert_official_to_plugin(official.folder, tmp_path / "hf", dtype="bf16", shard_size=SHARD, progress=False)
    state = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    for name, ref in official.reference.items():
        assert torch.equal(state[name].float(), ref.float()), name


def test_changed_weights_export_with_official_rule(tmp_path, official):
    """Blocks that no longer fit their original scale get the official rule's scale (exactly what
    `quantize_fp4` gives); untouched tensors still reproduce their original bytes."""
    convert_official_to_plugin(official.folder, tmp_path / "hf", dtype="bf16", shard_size=SHARD, progress=False)
    model = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        model.model.layers[2].mlp.experts.gate_up_proj.mul_(3.0)
    model.save_pretrained(tmp_path / "tuned")
    # Keeping the conversion's official scales next to the tuned weights keeps unchanged blocks byte-identical.
    for sidecar in (tmp_path / "hf").glob("official_scales*"):
        shutil.copy2(sidecar, tmp_path / "tuned" / sidecar.name)
    convert_plugin_to_official(tmp_path / "tuned", tmp_path / "back", progress=False)
    back, original = load_all(tmp_path / "back"), load_all(official.folder)
    tuned = model.model.layers[2].mlp.experts.gate_up_proj[0].float()
    inter = model.config.moe_intermediate_size
    q, s = quantize_fp4(tuned[:inter])
    assert same_bits(back["layers.2.ffn.experts.0.w1.weight"], q)
    assert same_bits(back["layers.2.ffn.experts.0.w1.scale"], s)
    assert same_bits(back["layers.2.ffn.experts.0.w2.weight"], original["layers.2.ffn.experts.0.w2.weight"])
    assert same_bits(back["layers.3.attn.wq_a.weight"], original["layers.3.attn.wq_a.weight"])


def test_fp4_to_fp8_transcoding_is_exact(tmp_path, official):
    transcode_experts_to_fp8(official.folder, tmp_path / "fp8", shard_size=SHARD, progress=False)
    tensors = load_all(tmp_path / "fp8")
    assert all(t.dtype != torch.int8 for t in tensors.values())
    assert "expert_dtype" not in json.loads((tmp_path / "fp8" / "config.json").read_text())
    convert_official_to_plugin(tmp_path / "fp8", tmp_path / "hf", dtype="fp32", progress=False)
    state = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    for name, ref in official.reference.items():
        assert torch.equal(state[name], ref.to(state[name].dtype)), name


def test_fp4_to_fp8_refuses_inexact_blocks(tmp_path, official):
    from tests.conversion.official_synth import _load_shard  # noqa: PLC2701 - test helper

    name = next(n for n in official.official if n.endswith("experts.0.w1.weight"))
    scale = name[: -len(".weight")] + ".scale"
    file = next(p for p in official.folder.glob("*.safetensors") if scale in _load_shard(p)[0])
    tensors, meta = _load_shard(file)
    raw = tensors[scale].view(torch.uint8).clone()
    raw[0, 0] = max(int(raw[0, 0]) - 20, 1)  # one group 2^20 smaller than its block neighbours
    tensors[scale] = raw.view(torch.float8_e8m0fnu)
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata=meta)
    packed = tensors.get(name)
    if packed is not None:
        assert packed.dtype == torch.int8
    with pytest.raises(ConversionError, match=r"experts\.0\.w1"):
        transcode_experts_to_fp8(official.folder, tmp_path / "fp8", progress=False)
    assert not (tmp_path / "fp8").exists() and not temp_dir_for(tmp_path / "fp8").exists()


def test_dry_run_writes_nothing(tmp_path, official, capsys):
    assert cli(["to-hf", str(official.folder), str(tmp_path / "hf"), "--dry-run", "--shard-size", "60KB"]) == 0
    out = capsys.readouterr().out
    assert "would write" in out and "shard" in out
    assert not (tmp_path / "hf").exists() and not temp_dir_for(tmp_path / "hf").exists()


def test_interrupted_conversion_resumes(tmp_path, official, monkeypatch):
    original_add = ShardedWriter.add
    calls = {"n": 0}

    def flaky(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 60:
            raise KeyboardInterrupt
        return original_add(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "add", flaky)
    # Ctrl-C (or SIGTERM, which the CLI turns into the same) keeps the finished shards and says how to continue.
    with pytest.raises(ConversionInterrupted, match="interrupted; the finished shards are kept in .* --resume"):
        convert_official_to_plugin(official.folder, tmp_path / "hf", dtype="bf16", shard_size=SHARD, progress=False)
    tmp = temp_dir_for(tmp_path / "hf")
    assert tmp.exists() and not (tmp_path / "hf").exists()
    written = sorted(p.name for p in tmp.glob("model-*.safetensors"))
    assert written
    with pytest.raises(ConversionError, match="--resume"):
        convert_official_to_plugin(official.folder, tmp_path / "hf", dtype="bf16", shard_size=SHARD, progress=False)
    monkeypatch.setattr(ShardedWriter, "add", original_add)
    before = {p.name: p.stat().st_mtime_ns for p in tmp.glob("model-*.safetensors")}
    convert_official_to_plugin(
        official.folder, tmp_path / "hf", dtype="bf16", shard_size=SHARD, progress=False, resume=True
    )
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "hf").glob("model-*.safetensors")}
    assert all(after[name] == before[name] for name in before)  # completed shards were kept, not redone
    convert_official_to_plugin(official.folder, tmp_path / "fresh", dtype="bf16", shard_size=SHARD, progress=False)
    a, b = load_all(tmp_path / "hf"), load_all(tmp_path / "fresh")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _assert_clean_failure(tmp_path, official, match):
    with pytest.raises(ConversionError, match=match):
        convert_official_to_plugin(official.folder, tmp_path / "hf", shard_size=SHARD, progress=False)
    assert not (tmp_path / "hf").exists() and not temp_dir_for(tmp_path / "hf").exists()


def test_missing_shard(tmp_path, official):
    victim = sorted(official.folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    _assert_clean_failure(tmp_path, official, f"{victim.name}.*missing")


def test_truncated_and_corrupt_shards(tmp_path, official):
    victim = sorted(official.folder.glob("model-*.safetensors"))[0]
    truncate_file(victim, 100)
    _assert_clean_failure(tmp_path, official, f"{victim.name}.*(truncated|corrupt)")


def test_corrupt_header(tmp_path, official):
    victim = sorted(official.folder.glob("model-*.safetensors"))[2]
    corrupt_header(victim)
    _assert_clean_failure(tmp_path, official, f"{victim.name}.*corrupt")


def test_unknown_and_missing_tensors(tmp_path, official):
    rename_tensor(official.folder, "layers.0.attn.attn_sink", "layers.0.attn.mystery")
    _assert_clean_failure(tmp_path, official, "unknown tensor 'layers.0.attn.mystery'")


def test_missing_tensor(tmp_path, official):
    drop_tensor(official.folder, "layers.1.ffn_norm.weight")
    _assert_clean_failure(tmp_path, official, "post_attention_layernorm")


def test_shape_contradicting_config(tmp_path, official):
    config = json.loads((official.folder / "config.json").read_text())
    config["q_lora_rank"] = config["q_lora_rank"] * 2
    (official.folder / "config.json").write_text(json.dumps(config))
    _assert_clean_failure(tmp_path, official, r"layers\.0\.attn\.(wq_a|q_norm|wq_b)\.weight.*shape")


def test_deepseek_v41_is_refused(tmp_path):
    # DSpark releases (0731) convert: tests/conversion/test_dspark_checkpoint.py.
    official = make_official_checkpoint(tmp_path / "official", tiny_config(), n_shards=2)
    config = json.loads((official.folder / "config.json").read_text())
    config["model_type"] = "deepseek_v41"
    (official.folder / "config.json").write_text(json.dumps(config))
    _assert_clean_failure(tmp_path, official, "V4.1")


def test_cli_reports_errors_with_exit_code(tmp_path, capsys):
    assert cli(["to-hf", str(tmp_path / "nope"), str(tmp_path / "hf")]) == 2
    assert "dsv4-convert: error" in capsys.readouterr().err


def test_base_variant_with_fp8_experts_and_float32_scales(tmp_path):
    official = make_official_checkpoint(tmp_path / "official", tiny_config(), n_shards=2, expert_format="fp8")
    convert_official_to_plugin(official.folder, tmp_path / "hf", dtype="fp32", progress=False)
    state = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    for name, ref in official.reference.items():
        assert torch.equal(state[name], ref.to(state[name].dtype)), name


def test_inference_config_is_used_when_root_config_is_missing(tmp_path):
    official = make_official_checkpoint(tmp_path / "official", tiny_config(), n_shards=2)
    root = json.loads((official.folder / "config.json").read_text())
    names = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}
    names.update({"moe_intermediate_size": "moe_inter_dim", "num_experts_per_tok": "n_activated_experts"})
    names.update({"routed_scaling_factor": "route_scale", "num_hash_layers": "n_hash_layers"})
    names.update({"sliding_window": "window_size", "qk_rope_head_dim": "rope_head_dim", "rms_norm_eps": "norm_eps"})
    args = {names.get(k, k): v for k, v in root.items() if k not in ("rope_scaling", "quantization_config")}
    yarn = root["rope_scaling"]
    args.update(rope_factor=yarn["factor"], original_seq_len=yarn["original_max_position_embeddings"])
    args.update(beta_fast=yarn["beta_fast"], beta_slow=yarn["beta_slow"])
    (official.folder / "inference").mkdir()
    (official.folder / "inference" / "config.json").write_text(json.dumps(args))
    (official.folder / "config.json").unlink()
    convert_official_to_plugin(official.folder, tmp_path / "hf", dtype="fp32", progress=False)
    model = DeepseekV4ExtForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.compress_ratios == root["compress_ratios"]
    assert model.config.rope_parameters["compress"]["factor"] == yarn["factor"]


def test_verify_reports_an_incomplete_folder(tmp_path):
    official = make_official_checkpoint(tmp_path / "official", tiny_config(), n_shards=2)
    convert_official_to_plugin(official.folder, tmp_path / "hf", shard_size=SHARD, progress=False)
    assert cli(["verify", str(tmp_path / "hf"), "--source", str(official.folder)]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("model.layers.1.self_attn.sinks")
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="sinks"):
        verify_folder(tmp_path / "hf")


def test_not_enough_disk_space_is_reported_before_writing(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    official = make_official_checkpoint(tmp_path / "official", tiny_config(), n_shards=2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    _assert_clean_failure(tmp_path, official, "GB free")
