"""The synthetic official-layout checkpoint (`official_synth.py`) matches official-format.md §3 / §6 / §8 / §11 and
its reference state dict matches the plugin model exactly."""

from __future__ import annotations

import json
import math
import struct
from collections import Counter

import pytest
import torch
from safetensors import SafetensorError, safe_open

from modeling_deepseek_v4 import DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM
from modeling_deepseek_v4.fp4_transcode import fp4_to_fp8_blocks
from tests.conftest import tiny_config
from tests.conversion.official_synth import (
    INDEX_NAME,
    corrupt_header,
    drop_tensor,
    make_official_checkpoint,
    rename_tensor,
    shard_name,
    truncate_file,
)

torch.set_num_threads(1)

CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
FP4_LUT = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def expected_counts(
    n_layers: int,
    n_mtp: int,
    n_csa: int,
    n_compressed: int,
    n_hash: int,
    n_experts: int,
    expert_format: str = "fp4",
) -> Counter:
    """Tensor count per dtype, derived from official-format.md §6.1-6.3 (the §6.4 reconciliation)."""
    experts = 3 * n_experts * (n_layers + n_mtp)
    fp8 = 8 * n_layers + n_csa + 10 * n_mtp
    counts = Counter(
        {
            "BF16": 3 + 5 * n_layers + 3 * n_compressed + 4 * n_csa + 8 * n_mtp,
            "F32": 3 + 7 * n_layers + n_compressed + n_csa + (n_layers - n_hash) + 11 * n_mtp,
            "I64": n_hash,
        }
    )
    if expert_format == "fp4":
        counts.update({"F8_E4M3": fp8, "I8": experts, "F8_E8M0": fp8 + experts})
    else:  # Base: FP8 experts with float32 block scales
        counts.update({"F8_E4M3": fp8 + experts, "F8_E8M0": fp8, "F32": experts})
    return +counts


def counts_for(cfg, expert_format: str = "fp4") -> Counter:
    n, rates = cfg.num_hidden_layers, cfg.compress_rates
    ratios = cfg.compress_ratios[:n]
    return expected_counts(
        n,
        cfg.num_nextn_predict_layers,
        sum(r == rates[CSA] for r in ratios),
        sum(r != 0 for r in ratios),
        cfg.num_hash_layers,
        cfg.n_routed_experts,
        expert_format,
    )


DTYPE_NAMES = {
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.int64: "I64",
    torch.int8: "I8",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e8m0fnu: "F8_E8M0",
}


def read_header(path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header


def read_folder(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX_NAME).read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / fname), framework="pt") as fh:
            for name in fh.keys():
                out[name] = fh.get_tensor(name)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.fixture(scope="module")
def flash_ckpt(tmp_path_factory):
    return make_official_checkpoint(tmp_path_factory.mktemp("flash"), tiny_config("flash"))


# ---- formula ---------------------------------------------------------------------------------------------------


def test_count_formula_reproduces_official_flash_totals():
    # official-format.md §6.4: V4-Flash (43 layers, 21 CSA, 41 compressed, 3 hash, 256 experts, 1 MTP)
    counts = expected_counts(43, 1, 21, 41, 3, 256)
    assert counts == Counter({"BF16": 433, "F32": 417, "F8_E4M3": 375, "F8_E8M0": 34167, "I64": 3, "I8": 33792})
    assert sum(counts.values()) == 69187


# ---- layout ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert_format", ["fp4", "fp8"])
def test_dtype_mix_matches_section_6(tmp_path, schedule, expert_format):
    cfg = tiny_config(schedule)
    ckpt = make_official_checkpoint(tmp_path, cfg, expert_format=expert_format)
    on_disk = Counter()
    for shard in ckpt.shards:
        on_disk.update(entry["dtype"] for entry in read_header(shard).values())
    assert on_disk == counts_for(cfg, expert_format)
    assert Counter(DTYPE_NAMES[t.dtype] for t in ckpt.official.values()) == on_disk
    expert = ckpt.official["layers.0.ffn.experts.0.w1.weight"]
    expert_scale = ckpt.official["layers.0.ffn.experts.0.w1.scale"]
    if expert_format == "fp4":
        assert expert.dtype == torch.int8 and expert_scale.dtype == torch.float8_e8m0fnu
        assert ckpt.config["expert_dtype"] == "fp4"
    else:
        assert expert.dtype == torch.float8_e4m3fn and expert_scale.dtype == torch.float32
        assert "expert_dtype" not in ckpt.config


def test_every_quantized_weight_has_its_scale(flash_ckpt):
    official = flash_ckpt.official
    assert not any(name.endswith((".weight.scale", "weight_scale_inv")) for name in official)
    quantized = [n for n, t in official.items() if t.dtype in (torch.float8_e4m3fn, torch.int8)]
    scales = {n for n in official if n.endswith(".scale")}
    assert {n[: -len(".weight")] + ".scale" for n in quantized} == scales
    for name in quantized:
        w, s = official[name], official[name[: -len(".weight")] + ".scale"]
        assert s.dtype == torch.float8_e8m0fnu, name
        if w.dtype == torch.int8:  # packed FP4: [out, in/2], scales [out, in/32]
            assert tuple(s.shape) == (w.shape[0], 2 * w.shape[1] // 32), name
        else:
            assert tuple(s.shape) == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)), name
    # no `.scale` for anything stored in BF16 / F32
    assert "layers.0.attn.q_norm.scale" not in official and "embed.scale" not in official


def test_official_names_and_shapes(flash_ckpt):
    cfg, o = tiny_config("flash"), flash_ckpt.official
    d, n, hd, qr = cfg.hidden_size, cfg.hc_mult, cfg.head_dim, cfg.q_lora_rank
    e, inter, ih, ihd = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.index_n_heads, cfg.index_head_dim
    shapes = {
        "embed.weight": (cfg.vocab_size, d),
        "head.weight": (cfg.vocab_size, d),
        "hc_head_fn": (n, n * d),
        "hc_head_scale": (1,),
        "layers.0.hc_attn_fn": ((2 + n) * n, n * d),
        "layers.0.hc_ffn_scale": (3,),
        "layers.0.attn.attn_sink": (cfg.num_attention_heads,),
        "layers.0.attn.wq_b.weight": (cfg.num_attention_heads * hd, qr),
        "layers.0.attn.wo_a.weight": (cfg.o_groups * cfg.o_lora_rank, cfg.num_attention_heads * hd // cfg.o_groups),
        "layers.0.ffn.gate.tid2eid": (cfg.vocab_size, cfg.num_experts_per_tok),
        "layers.0.ffn.experts.3.w1.weight": (inter, d // 2),
        "layers.0.ffn.experts.3.w2.weight": (d, inter // 2),
        "layers.2.attn.compressor.wkv.weight": (2 * hd, d),  # CSA
        "layers.2.attn.compressor.ape": (4, 2 * hd),
        "layers.2.attn.compressor.norm.weight": (hd,),
        "layers.2.attn.indexer.wq_b.weight": (ih * ihd, qr),
        "layers.2.attn.indexer.weights_proj.weight": (ih, d),
        "layers.2.attn.indexer.compressor.wgate.weight": (2 * ihd, d),
        "layers.2.attn.indexer.compressor.ape": (4, 2 * ihd),
        "layers.2.attn.indexer.compressor.norm.weight": (ihd,),
        "layers.2.ffn.gate.bias": (e,),
        "layers.3.attn.compressor.wkv.weight": (hd, d),  # HCA (rate 8 in the tiny schedule)
        "layers.3.attn.compressor.ape": (8, hd),
        "mtp.0.e_proj.weight": (d, d),
        "mtp.0.h_proj.scale": (1, 1),
        "mtp.0.enorm.weight": (d,),
        "mtp.0.hc_head_base": (n,),
        "mtp.0.ffn.gate.bias": (e,),
        "mtp.0.attn.wkv.weight": (hd, d),
    }
    for name, shape in shapes.items():
        assert tuple(o[name].shape) == shape, name
    absent = [
        "layers.1.attn.compressor.wkv.weight",  # ratio 0
        "layers.3.attn.indexer.wq_b.weight",  # HCA has no indexer
        "layers.1.ffn.gate.bias",  # hash layer
        "layers.2.ffn.gate.tid2eid",
        "mtp.0.ffn.gate.tid2eid",
        "mtp.0.attn.compressor.ape",
        "mtp.0.embed.weight",
    ]
    assert not [name for name in absent if name in o]
    tid2eid = o["layers.0.ffn.gate.tid2eid"]
    assert tid2eid.dtype == torch.int64 and int(tid2eid.min()) >= 0 and int(tid2eid.max()) < e
    assert all(len(set(row)) == len(row) for row in tid2eid.tolist())


# ---- shards and index ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5])
def test_index_covers_exactly_the_shards(tmp_path, n_shards):
    ckpt = make_official_checkpoint(tmp_path, tiny_config("flash"), n_shards=n_shards)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index) == {"metadata", "weight_map"}
    names = [shard_name(i, n_shards) for i in range(1, n_shards + 1)]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == names
    assert names[0] == f"model-00001-of-{n_shards:05d}.safetensors"
    in_files = {}
    for fname in names:
        header = read_header(tmp_path / fname)
        assert header, f"{fname} is empty"
        in_files.update(dict.fromkeys(header, fname))
    assert index["weight_map"] == in_files == ckpt.weight_map
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ckpt.official.values())
    loaded = read_folder(tmp_path)
    assert loaded.keys() == ckpt.official.keys()
    for name, tensor in ckpt.official.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(bits(loaded[name]), bits(tensor)), name


@pytest.mark.parametrize("n_shards", [2, 3, 4])
def test_shards_split_experts_and_scale_siblings(tmp_path, n_shards):
    ckpt = make_official_checkpoint(tmp_path, tiny_config("pro"), n_shards=n_shards)
    wm = ckpt.weight_map
    split_pairs = [n for n in wm if n.endswith(".weight") and wm.get(n[:-7] + ".scale", wm[n]) != wm[n]]
    assert split_pairs
    split_layers = [
        i for i in range(5) if len({f for n, f in wm.items() if n.startswith(f"layers.{i}.ffn.experts.")}) > 1
    ]
    assert split_layers
    if n_shards >= 3:  # a non-expert pair is split too
        assert any(".experts." not in n for n in split_pairs)


# ---- reference state dict --------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert_format", ["fp4", "fp8"])
def test_reference_matches_plugin_model(tmp_path, schedule, expert_format):
    cfg = tiny_config(schedule)
    ckpt = make_official_checkpoint(tmp_path, cfg, expert_format=expert_format)
    model = DeepseekV4ExtForCausalLM(cfg)
    expected = model.state_dict()
    assert list(ckpt.reference) != [] and set(ckpt.reference) == set(expected)
    for name, tensor in expected.items():
        ref = ckpt.reference[name]
        assert ref.shape == tensor.shape and ref.dtype == tensor.dtype, name
        assert not ref.is_floating_point() or bool(torch.isfinite(ref).all()), name
    model.load_state_dict(ckpt.reference, strict=True)
    assert torch.equal(model.lm_head.weight, ckpt.reference["lm_head.weight"])


def _fp8_decode(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Independent E4M3 x 128x128 decode: scale grid expanded by repeat_interleave, E8M0 as 2**(byte - 127)."""
    mult = s.float() if s.dtype == torch.float32 else torch.exp2(s.view(torch.uint8).double() - 127).float()
    grid = mult.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
    return q.float() * grid


def _fp4_decode(packed: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Independent FP4 decode: element 2j in the LOW nibble of byte j, 1x32 group scales."""
    b = packed.view(torch.uint8).long()
    codes = torch.stack((b & 15, b >> 4), dim=-1).flatten(-2)
    mult = torch.exp2(s.view(torch.uint8).double() - 127).float().repeat_interleave(32, -1)
    return FP4_LUT[codes] * mult


@pytest.mark.parametrize("expert_format", ["fp4", "fp8"])
def test_reference_is_the_exact_decode(tmp_path, expert_format):
    cfg = tiny_config("flash")
    ckpt = make_official_checkpoint(tmp_path, cfg, expert_format=expert_format)
    o, r = ckpt.official, ckpt.reference
    decode_expert = _fp4_decode if expert_format == "fp4" else _fp8_decode

    def fp8(module: str) -> torch.Tensor:
        return _fp8_decode(o[f"{module}.weight"], o[f"{module}.scale"])

    pairs = {
        "model.layers.2.self_attn.q_a_proj.weight": fp8("layers.2.attn.wq_a"),
        "model.layers.2.self_attn.o_a_proj.weight": fp8("layers.2.attn.wo_a"),
        "model.layers.2.self_attn.compressor.indexer.q_b_proj.weight": fp8("layers.2.attn.indexer.wq_b"),
        "model.layers.4.mlp.shared_experts.up_proj.weight": fp8("layers.4.ffn.shared_experts.w3"),
        "model.mtp.0.e_proj.weight": fp8("mtp.0.e_proj"),
        "model.embed_tokens.weight": o["embed.weight"].float(),
        "lm_head.weight": o["head.weight"].float(),
        "model.layers.3.self_attn.compressor.gate_proj.weight": o["layers.3.attn.compressor.wgate.weight"].float(),
        "model.layers.3.self_attn.compressor.position_bias": o["layers.3.attn.compressor.ape"],
        "model.layers.3.mlp.gate.e_score_correction_bias": o["layers.3.ffn.gate.bias"],
        "model.layers.0.mlp.gate.tid2eid": o["layers.0.ffn.gate.tid2eid"],
        "model.layers.0.attn_hc.fn": o["layers.0.hc_attn_fn"],
        "model.layers.0.self_attn.sinks": o["layers.0.attn.attn_sink"],
        "model.hc_head.hc_scale": o["hc_head_scale"],
        "model.mtp.0.hc_head.hc_fn": o["mtp.0.hc_head_fn"],
        "model.mtp.0.norm.weight": o["mtp.0.norm.weight"].float(),
    }
    for name, want in pairs.items():
        assert torch.equal(r[name], want), name
    inter = cfg.moe_intermediate_size
    for block in ("layers.1", "mtp.0"):
        native = f"model.{block}.mlp.experts" if block.startswith("layers") else "model.mtp.0.mlp.experts"
        gate_up, down = r[f"{native}.gate_up_proj"], r[f"{native}.down_proj"]
        for e in range(cfg.n_routed_experts):
            prefix = f"{block}.ffn.experts.{e}"
            w = {k: decode_expert(o[f"{prefix}.{k}.weight"], o[f"{prefix}.{k}.scale"]) for k in ("w1", "w2", "w3")}
            assert torch.equal(gate_up[e, :inter], w["w1"]) and torch.equal(gate_up[e, inter:], w["w3"])
            assert torch.equal(down[e], w["w2"])


def test_partial_multi_block_grids_with_varying_scales(tmp_path):
    cfg = tiny_config("flash", hidden_size=160, head_dim=64, moe_intermediate_size=160, num_hidden_layers=3,
                      compress_ratios=[0, 4, 8, 0])  # fmt: skip
    ckpt = make_official_checkpoint(tmp_path, cfg, n_shards=2)
    o = ckpt.official
    assert tuple(o["mtp.0.e_proj.scale"].shape) == (2, 2)  # 160 = 128 + 32: partial edge blocks
    assert tuple(o["layers.0.attn.wq_a.scale"].shape) == (1, 2)
    assert tuple(o["layers.0.attn.wq_b.scale"].shape) == (2, 1)
    assert tuple(o["layers.0.ffn.experts.0.w2.scale"].shape) == (160, 5)
    assert len(set(o["mtp.0.e_proj.scale"].view(torch.uint8).flatten().tolist())) > 1
    assert len(set(o["layers.0.ffn.experts.0.w1.scale"].view(torch.uint8).flatten().tolist())) > 3
    decoded = _fp8_decode(o["mtp.0.e_proj.weight"], o["mtp.0.e_proj.scale"])
    assert torch.equal(ckpt.reference["model.mtp.0.e_proj.weight"], decoded)
    model = DeepseekV4ExtForCausalLM(cfg)
    model.load_state_dict(ckpt.reference, strict=True)


def test_fp4_experts_transcode_losslessly_to_fp8(flash_ckpt):
    # group-scale spread inside each 128x128 block stays far below 2**14 (official-format.md §9)
    o = flash_ckpt.official
    for name in [n for n, t in o.items() if t.dtype == torch.int8]:
        _, _, issues = fp4_to_fp8_blocks(o[name], o[name[: -len(".weight")] + ".scale"], name=name)
        assert issues == [], name


def test_fp4_needs_in_dim_multiple_of_32(tmp_path):
    cfg = tiny_config("flash", moe_intermediate_size=48)
    with pytest.raises(ValueError, match="divisible by 32"):
        make_official_checkpoint(tmp_path, cfg)
    make_official_checkpoint(tmp_path, cfg, expert_format="fp8")  # FP8 blocks have no such constraint


def test_seed_determinism(tmp_path):
    a = make_official_checkpoint(tmp_path / "a", tiny_config("flash"), seed=3)
    b = make_official_checkpoint(tmp_path / "b", tiny_config("flash"), seed=3)
    c = make_official_checkpoint(tmp_path / "c", tiny_config("flash"), seed=4)
    assert all(torch.equal(bits(a.official[k]), bits(b.official[k])) for k in a.official)
    assert not torch.equal(a.reference["model.embed_tokens.weight"], c.reference["model.embed_tokens.weight"])


# ---- config and side files -------------------------------------------------------------------------------------


def test_config_json_official_spelling(flash_ckpt):
    cfg = tiny_config("flash")
    written = json.loads((flash_ckpt.folder / "config.json").read_text())
    assert written == flash_ckpt.config
    assert written["model_type"] == "deepseek_v4" and written["architectures"] == ["DeepseekV4ForCausalLM"]
    assert written["compress_ratios"] == [0, 0, 4, 8, 4, 0]  # layers + trailing MTP entry
    assert written["num_hash_layers"] == 2 and written["qk_rope_head_dim"] == 8
    assert written["rope_theta"] == 10000 and written["compress_rope_theta"] == 160000
    assert written["rope_scaling"] == {
        "type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1
    }  # fmt: skip
    assert written["expert_dtype"] == "fp4"
    assert written["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }  # fmt: skip
    assert written["torch_dtype"] == "bfloat16" and written["transformers_version"] == "4.57.1"
    assert written["tie_word_embeddings"] is False
    for key in ("layer_types", "rope_parameters", "mlp_layer_types", "partial_rotary_factor"):
        assert key not in written
    # tiny rates (HCA 8) are not the official 4 / 128: the non-official key is written
    assert written["compress_rates"] == {CSA: 4, HCA: 8}
    loaded = DeepseekV4ExtConfig.from_pretrained(flash_ckpt.folder)
    for key in ("compress_ratios", "compress_rates", "layer_types", "num_hash_layers", "qk_rope_head_dim",
                "rope_parameters", "hidden_size", "n_routed_experts", "routed_scaling_factor", "hc_mult"):  # fmt: skip
        assert getattr(loaded, key) == getattr(cfg, key), key


def test_official_rates_omit_compress_rates(tmp_path):
    cfg = tiny_config("flash", compress_ratios=[0, 0, 4, 128, 4, 0], compress_rates={CSA: 4, HCA: 128})
    ckpt = make_official_checkpoint(tmp_path, cfg, extra_files=False)
    assert "compress_rates" not in ckpt.config
    assert tuple(ckpt.official["layers.3.attn.compressor.ape"].shape) == (128, cfg.head_dim)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".safetensors")) == [
        "config.json",
        INDEX_NAME,
    ]
    assert DeepseekV4ExtConfig.from_pretrained(tmp_path).compress_ratios == cfg.compress_ratios


def test_side_files(flash_ckpt):
    folder = flash_ckpt.folder
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 1.0, "top_p": 1.0}
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size() == 97 and tok.encode("t5 t7").ids == [5, 7]
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == tok.id_to_token(1)
    written = {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}
    assert {p.relative_to(folder) for p in flash_ckpt.files} == written


def test_dspark_variant(tmp_path):
    """The 0731 / -Flash-DSpark contract (dspark.md §2.2-2.3): no MTP block; three full sliding-only blocks
    `mtp.{0,1,2}.*` with learned gates, plus `main_proj` / `main_norm` on stage 0 and the head extras on stage 2."""
    cfg = tiny_config("flash")
    ckpt = make_official_checkpoint(tmp_path, cfg, dspark=True)
    n, d, vocab, n_exp, hc = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.n_routed_experts, cfg.hc_mult
    rank = ckpt.config["dspark_markov_rank"]
    assert {k: v for k, v in ckpt.config.items() if k.startswith("dspark_")} == {
        "dspark_block_size": 5, "dspark_noise_token_id": vocab - 1, "dspark_target_layer_ids": [n - 3, n - 2, n - 1],
        "dspark_markov_rank": rank,
    }  # fmt: skip
    assert ckpt.config["num_nextn_predict_layers"] == 1  # stale, as in the release
    assert ckpt.config["compress_ratios"] == cfg.compress_ratios[:n] + [0, 0, 0]
    official = read_folder(tmp_path)
    drafter = [name for name in official if name.startswith("mtp.")]
    assert sorted(drafter) == sorted(ckpt.dspark)
    # dspark.md §2.3 count: per stage 2 norms + 6 hc + 13 attention + 2 gate + 6 E expert + 6 shared-expert
    # tensors, then main_proj (weight, scale), main_norm and 7 head extras (4,705 for the real 256 experts).
    assert len(drafter) == 3 * (29 + 6 * n_exp) + 10
    assert 3 * (29 + 6 * 256) + 10 == 4705
    f8, e8, bf16, f32 = torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.bfloat16, torch.float32
    expected = {
        "mtp.0.main_proj.weight": (f8, (d, 3 * d)),
        "mtp.0.main_proj.scale": (e8, (math.ceil(d / 128), math.ceil(3 * d / 128))),
        "mtp.0.main_norm.weight": (bf16, (d,)),
        "mtp.2.norm.weight": (bf16, (d,)),
        "mtp.2.hc_head_fn": (f32, (hc, hc * d)),
        "mtp.2.hc_head_base": (f32, (hc,)),
        "mtp.2.hc_head_scale": (f32, (1,)),
        "mtp.2.markov_head.markov_w1.weight": (bf16, (vocab, rank)),
        "mtp.2.markov_head.markov_w2.weight": (bf16, (vocab, rank)),
        "mtp.2.confidence_head.proj.weight": (bf16, (1, d + rank)),
        "mtp.1.ffn.gate.bias": (f32, (n_exp,)),
        "mtp.1.ffn.experts.0.w1.weight": (torch.int8, (cfg.moe_intermediate_size, d // 2)),
        "mtp.1.attn.wq_a.weight": (f8, (cfg.q_lora_rank, d)),
        "mtp.1.hc_attn_fn": (f32, ((2 + hc) * hc, hc * d)),
    }
    for name, (dtype, shape) in expected.items():
        assert official[name].dtype == dtype and tuple(official[name].shape) == shape, name
    for s in range(3):
        assert f"mtp.{s}.ffn.gate.tid2eid" not in official and f"mtp.{s}.e_proj.weight" not in official
        assert not any(k.startswith((f"mtp.{s}.attn.compressor.", f"mtp.{s}.attn.indexer.")) for k in official)
    assert "mtp.1.main_proj.weight" not in official and "mtp.0.norm.weight" not in official
    plugin = DeepseekV4ExtConfig.from_dict(ckpt.config)
    assert (plugin.dspark_num_stages, plugin.num_nextn_predict_layers) == (3, 0)
    DeepseekV4ExtForCausalLM(plugin).load_state_dict(ckpt.reference, strict=True)


# ---- damage helpers --------------------------------------------------------------------------------------------


def _read_all(path):
    with safe_open(str(path), framework="pt") as fh:
        return {name: fh.get_tensor(name) for name in fh.keys()}


def test_truncate_file(tmp_path):
    ckpt = make_official_checkpoint(tmp_path, tiny_config("flash"), n_shards=2, extra_files=False)
    shard = ckpt.shards[1]
    size = shard.stat().st_size
    truncate_file(shard, 100)
    assert shard.stat().st_size == size - 100
    with pytest.raises(SafetensorError, match="not fully covered"):
        _read_all(shard)


@pytest.mark.parametrize("part", ["length", "json"])
def test_corrupt_header(tmp_path, part):
    ckpt = make_official_checkpoint(tmp_path, tiny_config("flash"), n_shards=2, extra_files=False)
    corrupt_header(ckpt.shards[0], part)
    with pytest.raises(SafetensorError, match="header too large" if part == "length" else "invalid JSON"):
        _read_all(ckpt.shards[0])
    _read_all(ckpt.shards[1])


def test_drop_and_rename_tensor(tmp_path):
    ckpt = make_official_checkpoint(tmp_path, tiny_config("flash"), extra_files=False)
    scale = "layers.2.attn.wq_a.scale"
    shard = ckpt.weight_map[scale]
    total = json.loads((tmp_path / INDEX_NAME).read_text())["metadata"]["total_size"]
    drop_tensor(tmp_path, scale)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert scale not in index["weight_map"] and scale not in _read_all(tmp_path / shard)
    assert index["metadata"]["total_size"] == total - ckpt.official[scale].nbytes

    old, new = "layers.2.attn.wq_b.weight", "layers.2.attn.wq_b.weight_scale_inv"
    rename_tensor(tmp_path, old, new)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    tensors = _read_all(tmp_path / index["weight_map"][new])
    assert old not in index["weight_map"] and old not in tensors
    assert torch.equal(bits(tensors[new]), bits(ckpt.official[old]))
    loaded = read_folder(tmp_path)
    assert set(loaded) == (set(ckpt.official) - {scale, old}) | {new}
    with pytest.raises(KeyError):
        drop_tensor(tmp_path, scale)
