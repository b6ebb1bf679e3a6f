"""Every `DeepseekV4ExtConfig` value rule (modeling_deepseek_v4/config_checks.py): one case per rule, each a
`ValueError` whose one-line message names the field; valid spellings still load; `dsv4-convert to-hf` reports a bad
official config.json in one line."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from huggingface_hub.errors import StrictDataclassFieldValidationError

from modeling_deepseek_v4.config_checks import FieldTypeError
from modeling_deepseek_v4.configuration_deepseek_v4 import DeepseekV4ExtConfig
from modeling_deepseek_v4.conversion.checkpoint import temp_dir_for
from modeling_deepseek_v4.conversion.cli import main as cli
from tests.conftest import tiny_config
from tests.conversion.official_synth import make_official_checkpoint, official_config_dict
from tests.models.test_config import TINY

torch.set_num_threads(1)

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}
BASE = TINY  # the valid config the cases below break one field of
DSPARK = {
    "dspark_num_stages": 3,
    "dspark_block_size": 5,
    "dspark_noise_token_id": 255,
    "dspark_target_layer_ids": [1, 2, 3],
    "dspark_markov_rank": 8,
}
NAN, INF = float("nan"), float("inf")


def build(**overrides) -> DeepseekV4ExtConfig:
    return DeepseekV4ExtConfig(**{**BASE, **overrides})


def nested_rope(main: dict | None = None, compress: dict | None = None) -> dict:
    return {
        "rope_parameters": {
            "main": {"rope_type": "default", "rope_theta": 10000.0, **(main or {})},
            "compress": {"rope_type": "default", "rope_theta": 160000.0, **(compress or {})},
        }
    }


# Wrong JSON types: refused where assigned (`@strict`), reported as a one-line `FieldTypeError` (a ValueError).
TYPE_CASES = [
    ("hidden_size", {"hidden_size": "64"}),
    ("num_hidden_layers", {"num_hidden_layers": "4"}),
    ("vocab_size", {"vocab_size": 256.0}),
    ("hidden_size", {"hidden_size": True}),
    ("rms_norm_eps", {"rms_norm_eps": "1e-6"}),
    ("routed_scaling_factor", {"routed_scaling_factor": "2.5"}),
    ("rope_theta", {"rope_theta": "10000"}),
    ("norm_topk_prob", {"norm_topk_prob": "true"}),
    ("use_cache", {"use_cache": 1}),
    ("attention_bias", {"attention_bias": "false"}),
    ("reference_numerics", {"reference_numerics": 0}),
    ("tie_word_embeddings", {"tie_word_embeddings": None}),
    ("compress_ratios", {"compress_ratios": [0, 0, "4", 128]}),
    ("layer_types", {"layer_types": SWA}),
    ("compress_rates", {"compress_rates": [4, 128]}),
    ("eos_token_id", {"eos_token_id": [1, "2"]}),
    ("pad_token_id", {"pad_token_id": "0"}),
    ("rope_parameters", {"rope_parameters": "yarn"}),
    ("scoring_func", {"scoring_func": None}),
    ("dspark_markov_rank", {**DSPARK, "dspark_markov_rank": "8"}),
    ("dspark_target_layer_ids", {**DSPARK, "dspark_target_layer_ids": [1, True, 3]}),
    # Spellings that are not fields, checked before they are folded in.
    ("qk_rope_head_dim", {"qk_rope_head_dim": "8"}),
    ("mlp_layer_types", {"mlp_layer_types": "moe"}),
    ("rope_scaling", {"rope_scaling": "yarn"}),
    ("partial_rotary_factor", nested_rope(main={"partial_rotary_factor": "0.25"})),
    ("rope_parameters", {"rope_parameters": {"main": 5, "compress": {"rope_type": "default"}}}),
]

VALUE_CASES = [
    # sizes and counts: ints >= 1
    *[
        (field, {field: value})
        for field in (
            "vocab_size",
            "hidden_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "head_dim",
            "q_lora_rank",
            "o_groups",
            "o_lora_rank",
            "index_n_heads",
            "index_head_dim",
            "index_topk",
            "n_routed_experts",
            "hc_mult",
            "hc_sinkhorn_iters",
            "sliding_window",
            "max_position_embeddings",
            "attn_chunk_size",
            "indexer_chunk_size",
        )
        for value in (0, -1)
    ],
    ("num_nextn_predict_layers", {"num_nextn_predict_layers": -1}),
    ("dspark_num_stages", {"dspark_num_stages": -1}),
    # finite floats in range
    *[
        (field, {field: value})
        for field, values in (
            ("rms_norm_eps", (0.0, -1e-6, NAN)),
            ("hc_eps", (0.0, INF)),
            ("swiglu_limit", (0.0, -10.0, NAN)),
            ("routed_scaling_factor", (0.0, INF, NAN)),
            ("rope_theta", (0, -1.0, INF)),
            ("compress_rope_theta", (0.0, NAN)),
            ("initializer_range", (-0.02, NAN)),
            ("router_aux_loss_coef", (-0.001, INF)),
            ("attention_dropout", (-0.1, 1.5)),
        )
        for value in values
    ],
    ("partial_rotary_factor", {"partial_rotary_factor": NAN}),
    # what the model does not implement is refused, not ignored
    ("hidden_act", {"hidden_act": "gelu"}),
    ("attention_bias", {"attention_bias": True}),
    ("mlp_bias", {"mlp_bias": True}),
    ("norm_topk_prob", {"norm_topk_prob": False}),
    ("router_jitter_noise", {"router_jitter_noise": 0.01}),
    ("tie_word_embeddings", {"tie_word_embeddings": True}),
    ("num_key_value_heads", {"num_key_value_heads": 2}),
    # relations between fields
    ("o_groups", {"o_groups": 3}),
    ("qk_rope_head_dim", {"qk_rope_head_dim": 7}),
    ("qk_rope_head_dim", {"partial_rotary_factor": 2.0}),
    ("qk_rope_head_dim", {"index_head_dim": 2}),
    ("sliding_window", {"sliding_window": 4097}),
    ("index_head_dim", {"reference_numerics": True, "index_head_dim": 24}),
    ("num_experts_per_tok", {"num_experts_per_tok": 0}),
    ("num_experts_per_tok", {"num_experts_per_tok": 9}),
    ("num_hash_layers", {"num_hash_layers": 5}),
    ("num_hash_layers", {"num_hash_layers": -1}),
    ("n_shared_experts", {"n_shared_experts": 2}),
    ("n_shared_experts", {"n_shared_experts": -1}),
    ("scoring_func", {"scoring_func": "relu"}),
    ("ops_backend", {"ops_backend": "cuda"}),
    ("expert_dtype", {"expert_dtype": "int4"}),
    ("compress_rates", {"compress_rates": {CSA: 4, HCA: 4}}),
    ("compress_ratios", {"compress_ratios": [0, 0, 8, 128]}),
    ("layer_types", {"layer_types": ["full_attention"] * 4}),
    # token ids: null or in [0, vocab_size); eos may be a list
    ("bos_token_id", {"bos_token_id": 256}),
    ("bos_token_id", {"bos_token_id": -1}),
    ("pad_token_id", {"pad_token_id": 256}),
    ("pad_token_id", {"pad_token_id": -1}),
    ("eos_token_id", {"eos_token_id": 256}),
    ("eos_token_id", {"eos_token_id": [1, 256]}),
    ("eos_token_id", {"eos_token_id": [-1]}),
    # RoPE (official `rope_scaling`, native nested `rope_parameters`)
    ("rope_parameters['compress']['factor']", {"rope_scaling": {**YARN, "factor": 0}}),
    ("rope_parameters['compress']['factor']", {"rope_scaling": {**YARN, "factor": "16"}}),
    ("rope_parameters['compress']['factor']", {"rope_scaling": {**YARN, "factor": NAN}}),
    (
        "rope_parameters['compress']['original_max_position_embeddings']",
        {"rope_scaling": {**YARN, **{"original_max_position_embeddings": 0}}},
    ),
    (
        "rope_parameters['compress']['original_max_position_embeddings']",
        {"rope_scaling": {**YARN, "original_max_position_embeddings": 65536.5}},
    ),
    ("rope_parameters['compress']['beta_fast']", {"rope_scaling": {**YARN, "beta_fast": -32}}),
    ("rope_parameters['compress']['beta_slow']", {"rope_scaling": {**YARN, "beta_slow": 0}}),
    ("rope_parameters['compress']['beta_fast']", {"rope_scaling": {**YARN, "beta_fast": 1, "beta_slow": 32}}),
    ("rope_parameters['compress']['attention_factor']", {"rope_scaling": {**YARN, "attention_factor": 0.7}}),
    ("rope_parameters['compress']['rope_type']", {"rope_scaling": {"type": "llama3", "factor": 8.0}}),
    ("rope_parameters['main']['factor']", nested_rope(main={"rope_type": "yarn", "factor": -1.0})),
    ("rope_theta", nested_rope(main={"rope_theta": 0})),
    ("compress_rope_theta", nested_rope(compress={"rope_theta": -1.0})),
    # DSpark drafter keys
    ("dspark_block_size", {**DSPARK, "dspark_block_size": 0}),
    ("dspark_markov_rank", {**DSPARK, "dspark_markov_rank": 0}),
    ("dspark_noise_token_id", {**DSPARK, "dspark_noise_token_id": 256}),
    ("dspark_target_layer_ids", {**DSPARK, "dspark_target_layer_ids": [1, 2, 4]}),
]


def _ids(cases):
    return [f"{field}-{i}" for i, (field, _) in enumerate(cases)]


def assert_names_field(exc: BaseException, field: str) -> None:
    message = str(exc)
    assert f"invalid `{field}`=" in message, message
    assert "\n" not in message, message


@pytest.mark.parametrize(("field", "overrides"), TYPE_CASES, ids=_ids(TYPE_CASES))
def test_wrong_types_raise_clean_value_error(field, overrides):
    with pytest.raises(ValueError, match=re.escape(f"`{field}`")) as info:
        build(**overrides)
    assert_names_field(info.value, field)


@pytest.mark.parametrize(("field", "overrides"), VALUE_CASES, ids=_ids(VALUE_CASES))
def test_invalid_values_raise_naming_the_field(field, overrides):
    with pytest.raises(ValueError, match=re.escape(f"`{field}`")) as info:
        build(**overrides)
    assert_names_field(info.value, field)


def test_type_error_is_still_a_strict_dataclass_error():
    with pytest.raises(FieldTypeError) as info:
        build(hidden_size="64")
    assert isinstance(info.value, StrictDataclassFieldValidationError) and info.value.field == "hidden_size"
    assert "a JSON number, not a quoted string" in str(info.value)
    config = build()
    with pytest.raises(ValueError, match="expected true or false, got str"):
        config.use_cache = "yes"


@pytest.mark.parametrize(
    ("field", "value"),
    [("rms_norm_eps", 0.0), ("hidden_act", "relu"), ("pad_token_id", 999), ("sliding_window", 10**7)],
)
def test_validate_rechecks_after_edit(field, value):
    config = build()
    setattr(config, field, value)
    with pytest.raises(Exception, match=re.escape(f"`{field}`")):
        config.validate()


def test_rope_edit_is_checked_before_transformers_yarn_validator():
    config = build()
    config.rope_parameters["compress"]["original_max_position_embeddings"] = 0
    with pytest.raises(Exception, match="original_max_position_embeddings"):
        config.validate()


@pytest.mark.parametrize("source", ["default", "tiny", "official", "official_dspark", "native", "saved", "token_ids"])
def test_valid_configs_still_load(tmp_path, source):
    if source == "default":
        config = DeepseekV4ExtConfig()
    elif source == "tiny":
        config = tiny_config("pro")
    elif source == "official":
        config = DeepseekV4ExtConfig.from_dict(official_config_dict(tiny_config()))
    elif source == "official_dspark":
        config = DeepseekV4ExtConfig.from_dict(official_config_dict(tiny_config(), dspark=True))
        assert config.dspark_num_stages == 3
    elif source == "native":
        native = transformers.DeepseekV4Config(**BASE, num_hash_layers=1, rope_scaling=dict(YARN))
        config = DeepseekV4ExtConfig.from_dict(native.to_dict())
    elif source == "saved":
        tiny_config(expert_dtype="fp8", reference_numerics=True).save_pretrained(tmp_path)
        config = DeepseekV4ExtConfig.from_pretrained(tmp_path)
    else:
        config = build(pad_token_id=None, bos_token_id=None, eos_token_id=[1, 255])
        assert config.pad_token_id is None
    config.validate()
    config.save_pretrained(tmp_path / "again")
    assert DeepseekV4ExtConfig.from_pretrained(tmp_path / "again").to_dict() == config.to_dict()


# ---- dsv4-convert to-hf on an official folder with a bad config.json ----------------------------------------------


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
    return make_official_checkpoint(tmp_path_factory.mktemp("synth") / "official", tiny_config(), n_shards=2).folder


def bad_official(official_folder, tmp_path, key: str, value) -> str:
    folder = tmp_path / "official"
    shutil.copytree(official_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


CLI_CASES = [
    ("hidden_size", "64", "hidden_size"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps"),
    ("hidden_act", "gelu", "hidden_act"),
    ("norm_topk_prob", "yes", "norm_topk_prob"),
    ("eos_token_id", 10**6, "eos_token_id"),
    ("rope_scaling", {**YARN, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
]


@pytest.mark.parametrize(("key", "value", "field"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_reports_bad_config_value_in_one_line(official_folder, tmp_path, capsys, key, value, field):
    src, dst = bad_official(official_folder, tmp_path, key, value), tmp_path / "hf"
    assert cli(["to-hf", src, str(dst), "--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dsv4-convert: error: "), lines
    assert f"`{field}`" in lines[0] or f"['{field}']" in lines[0], lines[0]
    assert not dst.exists() and not temp_dir_for(dst).exists()


def test_cli_process_exits_2_without_traceback(official_folder, tmp_path):
    src, dst = bad_official(official_folder, tmp_path, "hidden_size", "64"), tmp_path / "hf"
    code = "import sys, dsv4_cli; sys.exit(dsv4_cli.convert_main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", code, "to-hf", src, str(dst), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dsv4-convert: error: "), run.stderr[-3000:]
    assert "`hidden_size`='64'" in lines[0] and "Traceback" not in run.stderr
    assert not dst.exists()


@pytest.mark.parametrize("field", ["swiglu_limit", "routed_scaling_factor", "hc_eps", "rms_norm_eps"])
def test_json_integers_are_accepted_where_a_float_belongs(field):
    """JSON writes 2.0 as 2 as often as not; a float field takes the integer as that float."""
    config = tiny_config(**{field: 2})
    assert getattr(config, field) == 2.0 and isinstance(getattr(config, field), float)
