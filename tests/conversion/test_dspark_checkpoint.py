"""The `-0731` / `-Flash-DSpark` release (issue 11): a V4-Flash whose `mtp.{0,1,2}.*` hold a DSpark drafter
(dspark.md §2.2-2.3, official-format.md §11) converts in every `--dtype` mode, loads as the V4-Flash it is with the
drafter as `model.dspark`, and exports back bit for bit. Synthetic checkpoint: `official_synth.py` (`dspark=True`).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
from modeling_deepseek_v4.batch_meta import BatchMeta
from modeling_deepseek_v4.conversion import ConversionError, convert_official_to_plugin
from modeling_deepseek_v4.conversion.cli import main as cli
from modeling_deepseek_v4.modeling_deepseek_v4 import DeepseekV4DecoderLayer
from modeling_deepseek_v4.quantized_modules import DeepseekV4Fp8Linear, DeepseekV4QuantizedExperts
from tests.conftest import tiny_config
from tests.conversion.official_synth import INDEX_NAME, make_official_checkpoint
from tests.conversion.test_convert import load_all, same_bits
from tests.conversion.test_official_synth import _fp4_decode, _fp8_decode

DTYPES = ("bf16", "fp32", "keep")
STAGES = 3
DSPARK_KEYS = ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return make_official_checkpoint(tmp_path_factory.mktemp("dspark") / "official", tiny_config(), dspark=True)


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    """dtype -> folder converted with `dsv4-convert to-hf --dtype <dtype>` (each made once, on first use)."""
    root, folders = tmp_path_factory.mktemp("dspark-hf"), {}

    def get(dtype: str):
        if dtype not in folders:
            dst = root / dtype
            argv = ["to-hf", str(official.folder), str(dst), "--dtype", dtype, "--shard-size", "60KB", "--no-progress"]
            assert cli(argv) == 0
            folders[dtype] = dst
        return folders[dtype]

    return get


def _without_drafter(src, dst):
    """A copy of the official folder without the drafter: no `mtp.*` tensors, no `dspark_*` keys, no stage ratios."""
    shutil.copytree(src, dst)
    index = json.loads((dst / INDEX_NAME).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        kept = {k: v for k, v in load_file(dst / shard).items() if not k.startswith("mtp.")}
        save_file(kept, str(dst / shard), metadata={"format": "pt"})
    kept = {k: v for k, v in index["weight_map"].items() if not k.startswith("mtp.")}
    index["weight_map"] = kept
    index["metadata"]["total_size"] = sum(t.nbytes for t in load_all(dst).values())
    (dst / INDEX_NAME).write_text(json.dumps(index))
    config = json.loads((dst / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("dspark_")}
    config["compress_ratios"] = config["compress_ratios"][: config["num_hidden_layers"]]
    config["num_nextn_predict_layers"] = 0
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


@pytest.mark.parametrize("dtype", ["bf16", "keep"])
def test_loads_as_v4_flash_with_the_drafter(official, converted, dtype):
    model = _load(converted(dtype))
    assert isinstance(model, DeepseekV4ExtForCausalLM)
    config = model.config
    assert len(model.model.mtp) == 0 and config.num_nextn_predict_layers == 0
    assert config.dspark_num_stages == STAGES and len(model.model.dspark.layers) == STAGES
    for key in DSPARK_KEYS:
        assert getattr(config, key) == official.config[key], key
    assert config.compress_ratios == official.config["compress_ratios"]
    for stage in model.model.dspark.layers:
        assert type(stage) is DeepseekV4DecoderLayer
        assert stage.self_attn.layer_type == "sliding_attention" and not stage.mlp.is_hash
    drafter = model.model.dspark
    quantized = dtype == "keep"
    assert isinstance(drafter.main_proj, DeepseekV4Fp8Linear) == quantized
    assert isinstance(drafter.layers[1].mlp.experts, DeepseekV4QuantizedExperts) == quantized
    assert isinstance(drafter.layers[2].self_attn.q_b_proj, DeepseekV4Fp8Linear) == quantized
    # The Markov and confidence heads stay dense bf16 in every mode, as in the official files.
    for module in (drafter.markov_head.markov_w1, drafter.markov_head.markov_w2, drafter.confidence_head.proj):
        assert type(module) in (torch.nn.Embedding, torch.nn.Linear) and module.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["bf16", "keep"])
def test_save_pretrained_round_trip(tmp_path, converted, dtype):
    model = _load(converted(dtype))
    model.save_pretrained(tmp_path / "saved")
    again = _load(tmp_path / "saved")
    assert again.config.to_diff_dict() | {"_name_or_path": ""} == model.config.to_diff_dict() | {"_name_or_path": ""}
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys() and any(k.startswith("model.dspark.") for k in ours)
    assert all(same_bits(ours[k], theirs[k]) for k in ours)


def _dense_drafter_state(drafter) -> dict[str, torch.Tensor]:
    """Every drafter tensor in fp32 under its dense plugin name; kept FP8 / FP4 modules are dequantized."""
    state = {}
    for name, module in drafter.named_modules():
        prefix = f"model.dspark.{name}." if name else "model.dspark."
        if isinstance(module, DeepseekV4QuantizedExperts):
            state[prefix + "gate_up_proj"], state[prefix + "down_proj"] = module.dequantized()
        elif hasattr(module, "dequantized_weight"):
            state[prefix + "weight"] = module.dequantized_weight()
        else:
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            state.update({prefix + key: tensor.float() for key, tensor in own})
    return state


def _independent_decode(o: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A sample of drafter weights decoded from the official tensors by test_official_synth's own decoders."""

    def fp8(module: str) -> torch.Tensor:
        return _fp8_decode(o[f"{module}.weight"], o[f"{module}.scale"])

    def fp4(module: str) -> torch.Tensor:
        return _fp4_decode(o[f"{module}.weight"], o[f"{module}.scale"])

    last = f"mtp.{STAGES - 1}."
    out = {
        "model.dspark.main_proj.weight": fp8("mtp.0.main_proj"),
        "model.dspark.main_norm.weight": o["mtp.0.main_norm.weight"].float(),
        "model.dspark.norm.weight": o[f"{last}norm.weight"].float(),
        "model.dspark.hc_head.hc_fn": o[f"{last}hc_head_fn"],
        "model.dspark.hc_head.hc_base": o[f"{last}hc_head_base"],
        "model.dspark.hc_head.hc_scale": o[f"{last}hc_head_scale"],
        "model.dspark.markov_head.markov_w1.weight": o[f"{last}markov_head.markov_w1.weight"].float(),
        "model.dspark.markov_head.markov_w2.weight": o[f"{last}markov_head.markov_w2.weight"].float(),
        "model.dspark.confidence_head.proj.weight": o[f"{last}confidence_head.proj.weight"].float(),
    }
    for s in range(STAGES):
        ours, theirs = f"model.dspark.layers.{s}.", f"mtp.{s}."
        n_experts = sum(1 for name in o if name.startswith(f"{theirs}ffn.experts.") and name.endswith(".w2.weight"))
        experts = [{w: fp4(f"{theirs}ffn.experts.{e}.{w}") for w in ("w1", "w2", "w3")} for e in range(n_experts)]
        out[f"{ours}mlp.experts.gate_up_proj"] = torch.stack([torch.cat([x["w1"], x["w3"]]) for x in experts])
        out[f"{ours}mlp.experts.down_proj"] = torch.stack([x["w2"] for x in experts])
        out[f"{ours}self_attn.q_a_proj.weight"] = fp8(f"{theirs}attn.wq_a")
        out[f"{ours}self_attn.o_a_proj.weight"] = fp8(f"{theirs}attn.wo_a")
        out[f"{ours}mlp.shared_experts.down_proj.weight"] = fp8(f"{theirs}ffn.shared_experts.w2")
        out[f"{ours}mlp.gate.e_score_correction_bias"] = o[f"{theirs}ffn.gate.bias"]
        out[f"{ours}attn_hc.fn"] = o[f"{theirs}hc_attn_fn"]
        out[f"{ours}input_layernorm.weight"] = o[f"{theirs}attn_norm.weight"].float()
    return out


@pytest.mark.parametrize("dtype", ["bf16", "keep"])
def test_drafter_weights_are_the_exact_official_decode(official, converted, dtype):
    state = _dense_drafter_state(_load(converted(dtype)).model.dspark)
    reference = {k: v.float() for k, v in official.reference.items() if k.startswith("model.dspark.")}
    assert state.keys() == reference.keys()
    for name, ref in reference.items():
        assert torch.equal(state[name], ref), name
    # Independently of the synthetic writer's own decode:
    for name, ref in _independent_decode(official.official).items():
        assert torch.equal(state[name], ref), name


def test_the_drafter_does_not_change_the_main_model(tmp_path, official, converted):
    plain = tmp_path / "plain-hf"
    convert_official_to_plugin(_without_drafter(official.folder, tmp_path / "plain"), plain, progress=False)
    with_drafter, without = _load(converted("bf16")), _load(plain)
    assert without.model.dspark is None and len(without.model.mtp) == 0
    ours = {k: v for k, v in with_drafter.state_dict().items() if not k.startswith("model.dspark.")}
    theirs = without.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.randint(0, with_drafter.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = with_drafter(ids, use_cache=False).logits, without(ids, use_cache=False).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_each_stage_runs_as_a_decoder_layer(converted):
    """A stage on random streams: same result from the dense (bf16 weights) and the kept FP8 / FP4 stage, and the
    three stages hold different weights."""
    dense, keep = _load(converted("bf16"), dtype=torch.float32), _load(converted("keep"), dtype=torch.float32)
    cfg = dense.config
    streams = torch.randn(2, 7, cfg.hc_mult, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([7, 5])
    outputs = []
    with torch.no_grad():
        for s in range(STAGES):
            out, (scores, indices) = dense.model.dspark.layers[s](
                streams, meta=BatchMeta(torch.zeros_like(lengths), lengths, 7, dense.model.rope_tables)
            )
            kept, _ = keep.model.dspark.layers[s](
                streams, meta=BatchMeta(torch.zeros_like(lengths), lengths, 7, keep.model.rope_tables)
            )
            assert out.shape == streams.shape and bool(torch.isfinite(out).all())
            assert scores.shape == (14, cfg.n_routed_experts) and indices.shape == (14, cfg.num_experts_per_tok)
            torch.testing.assert_close(kept, out, rtol=1e-4, atol=1e-5)
            outputs.append(out)
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])


def test_markov_and_confidence_heads(converted):
    drafter = _load(converted("bf16"), dtype=torch.float32).model.dspark
    prev = torch.tensor([[3, 96, 0]])
    w1, w2 = drafter.markov_head.markov_w1.weight, drafter.markov_head.markov_w2.weight
    with torch.no_grad():
        bias, e = drafter.markov_head(prev)
        torch.testing.assert_close(bias, w1[prev] @ w2.T)
        hidden = torch.randn(1, 3, drafter.main_norm.weight.shape[0], generator=torch.Generator().manual_seed(0))
        logit = drafter.confidence_head(hidden, e)
    assert logit.shape == (1, 3) and logit.dtype == torch.float32
    torch.testing.assert_close(logit, torch.cat([hidden, e], -1) @ drafter.confidence_head.proj.weight[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_reproduces_every_official_tensor(tmp_path, official, converted, dtype):
    back = tmp_path / "back"
    assert cli(["to-official", str(converted(dtype)), str(back), "--no-progress"]) == 0
    original, exported = load_all(official.folder), load_all(back)
    assert set(exported) == set(original)
    assert {n for n in original if n.startswith("mtp.")} == set(official.dspark)
    for name in original:
        assert same_bits(original[name], exported[name]), name
    config = json.loads((back / "config.json").read_text())
    for key in DSPARK_KEYS:
        assert config[key] == official.config[key], key
    assert config["compress_ratios"] == official.config["compress_ratios"]
    assert config["num_nextn_predict_layers"] == 1  # as the release writes it (stale)


@pytest.mark.parametrize("dtype", ["bf16", "keep"])
def test_verify_passes_on_every_tensor(official, converted, dtype, capsys):
    folder = converted(dtype)
    capsys.readouterr()  # drop the conversion report when this test made the folder
    assert cli(["verify", str(folder), "--source", str(official.folder), "--samples", "100000"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {n for n in summary["sampled_equal"] if n.startswith("model.dspark.")} == {
        k for k in official.reference if k.startswith("model.dspark.")
    }


def test_deepseek_v41_is_still_refused(tmp_path, official):
    folder = shutil.copytree(official.folder, tmp_path / "v41")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "deepseek_v41"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"DeepSeek-V4\.1 .*different architecture"):
        convert_official_to_plugin(folder, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        # Drafter tensors but no dspark_* keys: not silently converted as an MTP block.
        (dict.fromkeys(DSPARK_KEYS), "dspark"),
        ({"compress_ratios": "nonzero-stage"}, "compress_ratios"),
        ({"dspark_target_layer_ids": [3, 4, 5]}, "dspark_target_layer_ids"),
        ({"dspark_markov_rank": 16}, r"(markov_w1|confidence_head).*shape"),
    ],
    ids=["no-dspark-keys", "stage-ratio", "target-layer", "markov-rank"],
)  # fmt: skip
def test_inconsistent_dspark_checkpoints_are_refused(tmp_path, official, changes, match):
    folder = shutil.copytree(official.folder, tmp_path / "bad")
    if changes.get("compress_ratios") == "nonzero-stage":
        changes["compress_ratios"] = official.config["compress_ratios"][:-1] + [4]
    _edit_config(folder, **changes)
    with pytest.raises(ConversionError, match=match):
        convert_official_to_plugin(folder, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_inference_config_counts_the_stages(tmp_path, official):
    """Without a root config.json, the reference `inference/config.json` is read; in a DSpark release its
    `n_mtp_layers` (3) counts the drafter's stages (dspark.md §2.2)."""
    folder = shutil.copytree(official.folder, tmp_path / "official")
    root = json.loads((folder / "config.json").read_text())
    names = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}
    names.update({"moe_intermediate_size": "moe_inter_dim", "num_experts_per_tok": "n_activated_experts"})
    names.update({"num_nextn_predict_layers": "n_mtp_layers", "num_hash_layers": "n_hash_layers"})
    names.update({"routed_scaling_factor": "route_scale", "sliding_window": "window_size"})
    names.update({"qk_rope_head_dim": "rope_head_dim", "rms_norm_eps": "norm_eps"})
    args = {names.get(k, k): v for k, v in root.items() if k not in ("rope_scaling", "quantization_config")}
    args.update(n_mtp_layers=STAGES, rope_factor=root["rope_scaling"]["factor"], original_seq_len=65536)
    (folder / "inference").mkdir()
    (folder / "inference" / "config.json").write_text(json.dumps(args))
    (folder / "config.json").unlink()
    convert_official_to_plugin(folder, tmp_path / "hf", progress=False)
    config = _load(tmp_path / "hf").config
    assert (config.dspark_num_stages, config.num_nextn_predict_layers) == (STAGES, 0)
    assert config.dspark_target_layer_ids == root["dspark_target_layer_ids"]


def test_fp8_expert_release_converts(tmp_path, official):
    """`dsv4-convert fp4-to-fp8` of the release (the stages' experts included) still converts exactly."""
    assert cli(["fp4-to-fp8", str(official.folder), str(tmp_path / "fp8"), "--no-progress"]) == 0
    assert not any(t.dtype == torch.int8 for t in load_all(tmp_path / "fp8").values())
    convert_official_to_plugin(tmp_path / "fp8", tmp_path / "hf", dtype="keep", progress=False)
    model = _load(tmp_path / "hf")
    assert model.model.dspark.layers[0].mlp.experts.fmt == "fp8"
    state = _dense_drafter_state(model.model.dspark)
    for name, ref in official.reference.items():
        if name.startswith("model.dspark."):
            assert torch.equal(state[name], ref.float()), name
