"""LoRA export to the engines' per-expert PEFT layout (`conversion/lora_export.py`): the documented key names and
shapes, every exported pair's `B @ A * lora_alpha / r` equal to our per-expert / per-projection delta (`wo_a`
included), an exact export -> import round trip, an import without the export metadata that loads and computes
the same model, and bad input refused with nothing half-written."""

import json
import shutil

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from modeling_deepseek_v4.conversion import ConversionError, lora_export  # noqa: E402
from modeling_deepseek_v4.conversion.checkpoint import temp_dir_for  # noqa: E402
from modeling_deepseek_v4.conversion.lora_export import export_lora, import_lora  # noqa: E402
from modeling_deepseek_v4.expert_lora import expert_lora_config, load_expert_lora  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

torch.set_num_threads(1)

R, ALPHA, R_DOWN = 4, 8, 2
GROUPS, D_G, IN_G = 2, 16, 64  # tiny config: o_groups 2, o_lora_rank 16, 4 heads * 32 / 2 per group
EXPERTS, HIDDEN, INTER, Q_RANK = 4, 64, 32, 32
BLOCKS = [f"layers.{i}" for i in range(5)] + ["mtp.0"]  # tiny "flash": 5 decoder layers + 1 MTP block
R_EXPORT = GROUPS * R  # wo_a's stacked rank is the largest
PROMPT = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ours") / "adapter"
    config = expert_lora_config(
        r=R,
        lora_alpha=ALPHA,
        target_modules=["q_a_proj", "o_a_proj", "experts"],
        init_lora_weights=False,
        rank_pattern={"experts.down_proj": R_DOWN},
    )
    get_peft_model(tiny_model(), config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["vllm", "sglang"])
def exported(request, adapter, tmp_path_factory):
    dst = tmp_path_factory.mktemp(request.param) / "adapter"
    return request.param, dst, export_lora(adapter, dst, request.param)


def _read(folder):
    return json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")


def _our_deltas(folder):
    """{(module, projection): scaling * B @ A} by our layers' rules: scaling = lora_alpha / (rank of the factors)."""
    config, tensors = _read(folder)
    assert not config["alpha_pattern"]
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module, projection = key[len("base_model.model.") :].split(".lora_A.")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        rank = a.shape[-2] ** 0.5 if config["use_rslora"] else a.shape[-2]
        deltas[module, projection] = (b @ a) * (config["lora_alpha"] / rank)
    return deltas


def _engine_deltas(folder):
    """{module: B @ A * lora_alpha / r} as both engines compute it (one scaling for the whole adapter)."""
    config, tensors = _read(folder)
    assert not config["use_rslora"]
    scaling = config["lora_alpha"] / config["r"]
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[key[len("base_model.model.") : -len(".lora_A.weight")]] = (b @ a) * scaling
    return deltas


def _engine_module(block, leaf, layout, expert=None):
    """The documented names: vLLM reads official checkpoint names (its hf_to_vllm_mapper renames them), SGLang its
    own (`remap_weight_name_to_dpsk_hf_format`)."""
    if layout == "vllm":
        return f"{block}.ffn.experts.{expert}.{leaf}" if expert is not None else f"{block}.attn.{leaf}"
    prefix = f"model.{block}" if block.startswith("layers.") else block
    leaf = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}.get(leaf, leaf)
    return f"{prefix}.mlp.experts.{expert}.{leaf}" if expert is not None else f"{prefix}.self_attn.{leaf}"


def _expected_shapes(layout):
    """{engine module: (A shape, B shape)}: vLLM keeps each pair's own rank, SGLang pads all to the config's `r`."""

    def rank(r):
        return R_EXPORT if layout == "sglang" else r

    shapes = {}
    for block in BLOCKS:
        shapes[_engine_module(block, "wq_a", layout)] = ((rank(R), HIDDEN), (Q_RANK, rank(R)))
        shapes[_engine_module(block, "wo_a", layout)] = ((R_EXPORT, IN_G), (GROUPS * D_G, R_EXPORT))
        for e in range(EXPERTS):
            for w in ("w1", "w3"):
                shapes[_engine_module(block, w, layout, e)] = ((rank(R), HIDDEN), (INTER, rank(R)))
            shapes[_engine_module(block, "w2", layout, e)] = ((rank(R_DOWN), INTER), (HIDDEN, rank(R_DOWN)))
    return shapes


def test_key_names_shapes_and_config_follow_the_engine_layout(exported):
    layout, folder, summary = exported
    config, tensors = _read(folder)
    shapes = _expected_shapes(layout)
    expected = {}
    for module, (a, b) in shapes.items():
        expected[f"base_model.model.{module}.lora_A.weight"] = a
        expected[f"base_model.model.{module}.lora_B.weight"] = b
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    # our main scaling 8 / 4 = 2 is kept: r = the largest pair rank, lora_alpha = 2 * r
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (R_EXPORT, 2 * R_EXPORT, False)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and config["peft_type"] == "LORA"
    leaves = ["w1", "w2", "w3", "wo_a", "wq_a"] if layout == "vllm" else ["down_proj", "gate_proj", "up_proj"]
    assert config["target_modules"] == sorted(leaves + (["wo_a", "wq_a"] if layout == "sglang" else []))
    assert summary == {
        "layout": layout,
        "r": R_EXPORT,
        "lora_alpha": 2 * R_EXPORT,
        "modules": 3 * len(BLOCKS),
        "tensors": len(expected),
        "dropped": [],
    }
    for block in BLOCKS:
        for e in range(EXPERTS):  # gate and up keep separate A tensors with the same values
            gate, up = (f"base_model.model.{_engine_module(block, w, layout, e)}.lora_A.weight" for w in ("w1", "w3"))
            assert torch.equal(tensors[gate], tensors[up])
        wo_b = tensors[f"base_model.model.{_engine_module(block, 'wo_a', layout)}.lora_B.weight"]
        blocks = wo_b.reshape(GROUPS, D_G, GROUPS, R)
        assert not blocks[0, :, 1].any() and not blocks[1, :, 0].any()  # block-diagonal: groups never mix


def test_each_exported_pair_reproduces_our_delta(adapter, exported):
    layout, folder, _ = exported
    ours, theirs = _our_deltas(adapter), _engine_deltas(folder)
    assert len(theirs) == len(_expected_shapes(layout))
    for block in BLOCKS:
        prefix = f"model.{block}"
        pairs = [
            (_engine_module(block, "wq_a", layout), ours[f"{prefix}.self_attn.q_a_proj", "weight"]),
            # grouped wo_a: our [g, d_g, in_g] deltas stacked by group = the stored weight's [g * d_g, in_g] rows
            (_engine_module(block, "wo_a", layout), ours[f"{prefix}.self_attn.o_a_proj", "weight"].flatten(0, 1)),
        ]
        gate_up, down = ours[f"{prefix}.mlp.experts", "gate_up_proj"], ours[f"{prefix}.mlp.experts", "down_proj"]
        for e in range(EXPERTS):
            pairs += [
                (_engine_module(block, "w1", layout, e), gate_up[e, :INTER]),
                (_engine_module(block, "w3", layout, e), gate_up[e, INTER:]),
                (_engine_module(block, "w2", layout, e), down[e]),
            ]
        for module, delta in pairs:
            assert theirs[module].shape == delta.shape, module
            torch.testing.assert_close(theirs[module], delta, rtol=0, atol=1e-6, msg=module)


def test_export_then_import_gives_back_our_adapter_exactly(adapter, exported, tmp_path):
    layout, folder, _ = exported
    back = tmp_path / "back"
    assert import_lora(folder, back, layout) == {
        "modules": 3 * len(BLOCKS),
        "tensors": 8 * len(BLOCKS),
        "exact": True,
    }
    assert (back / "adapter_config.json").read_text() == (adapter / "adapter_config.json").read_text()
    original, restored = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(back / "adapter_model.safetensors"),
    )
    assert sorted(restored) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(restored[key], tensor), key


def test_import_without_the_metadata_computes_the_same_model(adapter, exported, tmp_path):
    """A plain engine adapter (no export metadata): rebuilt with other ranks (`rank_pattern`), the same deltas."""
    layout, folder, _ = exported
    with pytest.raises(ConversionError, match="groups="):
        import_lora(folder, tmp_path / "no_groups", layout, use_metadata=False)
    assert not (tmp_path / "no_groups").exists()
    back = tmp_path / "generic"
    assert import_lora(folder, back, layout, groups=GROUPS, use_metadata=False)["exact"] is False
    config = json.loads((back / "adapter_config.json").read_text())
    assert config["rank_pattern"]["o_a_proj"] == R  # the block-diagonal wo_a pair is split back per group
    ours, rebuilt = _our_deltas(adapter), _our_deltas(back)  # the layers scale by the factors' (patterned) rank
    assert rebuilt.keys() == ours.keys()
    for key, delta in ours.items():
        torch.testing.assert_close(rebuilt[key], delta, rtol=0, atol=1e-6, msg=str(key))
    with torch.no_grad():
        expected = load_expert_lora(tiny_model(), adapter)(PROMPT).logits
        got = load_expert_lora(tiny_model(), back)(PROMPT).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["vllm", "sglang"])
def test_every_linear_target_with_rslora(tmp_path, layout):
    """Attention, compressor, indexer and shared-expert linears keep their official / SGLang names; rsLoRA's
    alpha / sqrt(r) becomes the engines' plain alpha / r."""
    ours = tmp_path / "ours"
    targets = ["q_a_proj", "q_b_proj", "kv_proj", "o_b_proj", "gate_proj", "up_proj", "down_proj", "weights_proj"]
    config = expert_lora_config(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False, use_rslora=True)
    get_peft_model(tiny_model(), config).save_pretrained(ours)
    assert export_lora(ours, tmp_path / "out", layout)["lora_alpha"] == 12  # 6 / sqrt(4) = 12 / 4
    theirs = _engine_deltas(tmp_path / "out")
    official = {
        "self_attn.q_a_proj": "attn.wq_a",
        "self_attn.q_b_proj": "attn.wq_b",
        "self_attn.kv_proj": "attn.wkv",
        "self_attn.o_b_proj": "attn.wo_b",
        "self_attn.compressor.kv_proj": "attn.compressor.wkv",
        "self_attn.compressor.gate_proj": "attn.compressor.wgate",
        "self_attn.compressor.indexer.kv_proj": "attn.indexer.compressor.wkv",
        "self_attn.compressor.indexer.gate_proj": "attn.indexer.compressor.wgate",
        "self_attn.compressor.indexer.q_b_proj": "attn.indexer.wq_b",
        "self_attn.compressor.indexer.scorer.weights_proj": "attn.indexer.weights_proj",
        "mlp.shared_experts.gate_proj": "ffn.shared_experts.w1",
        "mlp.shared_experts.down_proj": "ffn.shared_experts.w2",
        "mlp.shared_experts.up_proj": "ffn.shared_experts.w3",
    }
    seen = set()
    for (module, _), delta in _our_deltas(ours).items():
        block, suffix = module[len("model.") :].split(".", 2)[:2], module.split(".", 3)[3]
        name = f"{'.'.join(block)}.{official[suffix]}"
        if layout == "sglang":
            name = (f"model.{name}" if name.startswith("layers.") else name).replace(".attn.", ".self_attn.")
            name = name.replace(".ffn.", ".mlp.").replace(".w1", ".gate_proj").replace(".w2", ".down_proj")
            name = name.replace(".w3", ".up_proj")
        torch.testing.assert_close(theirs[name], delta, rtol=0, atol=1e-6, msg=name)
        seen.add(name)
    assert seen == set(theirs)
    import_lora(tmp_path / "out", tmp_path / "back", layout)
    original, restored = (
        load_file(ours / "adapter_model.safetensors"),
        load_file(tmp_path / "back" / "adapter_model.safetensors"),
    )
    assert sorted(restored) == sorted(original) and all(torch.equal(restored[k], v) for k, v in original.items())


def test_wo_a_can_be_left_out(adapter, tmp_path):
    summary = export_lora(adapter, tmp_path / "no_wo_a", "vllm", wo_a="drop")
    config, tensors = _read(tmp_path / "no_wo_a")
    assert summary["dropped"] == sorted(f"model.{b}.self_attn.o_a_proj" for b in BLOCKS)
    assert not any("wo_a" in k for k in tensors) and "wo_a" not in config["target_modules"]
    assert (config["r"], config["lora_alpha"]) == (R, ALPHA)  # no stacked wo_a: the original r and alpha
    assert import_lora(tmp_path / "no_wo_a", tmp_path / "back", "vllm")["exact"] is False
    config, restored = _read(tmp_path / "back")
    assert sorted(config["target_modules"]) == ["experts", "q_a_proj"]  # o_a_proj must not come back initialized
    original = load_file(adapter / "adapter_model.safetensors")
    assert sorted(restored) == sorted(k for k in original if "o_a_proj" not in k)
    assert all(torch.equal(v, original[k]) for k, v in restored.items())


# ---------------------------------------------------------------------------------------------- bad input
def _nothing_written(dst):
    return not dst.exists() and not temp_dir_for(dst).exists() and not (dst.parent / f".{dst.name}.dsv4-lock").exists()


def test_a_folder_that_is_not_an_adapter_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConversionError, match="no adapter_config.json, so this is not a PEFT adapter folder"):
        export_lora(tmp_path / "src", tmp_path / "dst")
    with pytest.raises(ConversionError, match="not a folder"):
        export_lora(tmp_path / "missing", tmp_path / "dst")
    assert _nothing_written(tmp_path / "dst")


@pytest.mark.parametrize(
    "extra, message, named",
    [
        (
            {"base_model.model.model.layers.0.self_attn.q_a_proj.lora_magnitude_vector": torch.ones(32)},
            "not LoRA factors",
            "q_a_proj.lora_magnitude_vector",
        ),
        (
            {
                "base_model.model.lm_head.lora_A.weight": torch.ones(4, 64),
                "base_model.model.lm_head.lora_B.weight": torch.ones(97, 4),
            },
            "outside the decoder",
            "`lm_head`",
        ),
    ],
)
def test_unknown_keys_are_refused_and_nothing_is_written(adapter, tmp_path, extra, message, named):
    src = tmp_path / "src"
    shutil.copytree(adapter, src)
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({**tensors, **extra}, src / "adapter_model.safetensors")
    with pytest.raises(ConversionError, match=message) as error:
        export_lora(src, tmp_path / "dst", "sglang")
    assert str(src) in str(error.value) and named in str(error.value)  # what, where
    assert _nothing_written(tmp_path / "dst")


def test_bad_layout_existing_destination_and_foreign_layout_are_refused(adapter, exported, tmp_path):
    layout, folder, _ = exported
    with pytest.raises(ValueError, match="layout='tensorrt'"):
        export_lora(adapter, tmp_path / "dst", "tensorrt")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        export_lora(adapter, tmp_path / "taken", layout)
    assert list((tmp_path / "taken").iterdir()) == []
    other = "sglang" if layout == "vllm" else "vllm"
    with pytest.raises(ConversionError, match=f"exported for '{layout}', not '{other}'"):
        import_lora(folder, tmp_path / "back", other)
    assert _nothing_written(tmp_path / "dst") and _nothing_written(tmp_path / "back")


def test_an_export_changed_afterwards_is_not_restored_from_its_metadata(exported, tmp_path):
    layout, folder, _ = exported
    src = tmp_path / "changed"
    shutil.copytree(folder, src)
    tensors = load_file(src / "adapter_model.safetensors")
    with safe_open(src / "adapter_model.safetensors", "pt") as f:  # keep the export metadata
        metadata = f.metadata()
    key = f"base_model.model.{_engine_module('layers.3', 'wo_a', layout)}.lora_B.weight"
    tensors[key][0, -1] = 1.0  # group 0's rows now read group 1's rank slice
    save_file(tensors, src / "adapter_model.safetensors", metadata=metadata)
    with pytest.raises(ConversionError, match="use_metadata=False"):
        import_lora(src, tmp_path / "back", layout)
    assert _nothing_written(tmp_path / "back")
    import_lora(src, tmp_path / "generic", layout, groups=GROUPS, use_metadata=False)  # shared-A form: still exact
    got = _our_deltas(tmp_path / "generic")["model.layers.3.self_attn.o_a_proj", "weight"].flatten(0, 1)
    torch.testing.assert_close(got, _engine_deltas(src)[_engine_module("layers.3", "wo_a", layout)], rtol=0, atol=1e-6)


def test_a_failure_while_writing_leaves_nothing_behind(adapter, tmp_path, monkeypatch):
    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(lora_export, "save_file", broken)
    with pytest.raises(ConversionError, match="No space left on device; nothing was written"):
        export_lora(adapter, tmp_path / "dst")
    assert _nothing_written(tmp_path / "dst")
