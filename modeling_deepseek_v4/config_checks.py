"""Every rule a `DeepseekV4ExtConfig` value must satisfy (the config file keeps the spellings and their folding).

The rules run on every construction (`__post_init__`: `from_pretrained`, `from_dict`, the converter's
`plugin_config_from_official`) and again through `validate()` (the `@strict` class validators: after every
construction, and on `save_pretrained`). A bad value raises `ValueError` naming the field, the value and what is
allowed, in one line (`dsv4-convert` prints it as is). A value of the wrong JSON type (`"hidden_size": "64"`,
`"use_cache": "true"`) is refused where it is assigned, by huggingface_hub's `@strict` type check;
`clean_type_errors` turns that two-line `StrictDataclassFieldValidationError` into a `FieldTypeError`, which is both
a `ValueError` and the original class.

The allowed values follow the official root `config.json` (docs/official-format.md §3) and the name mapping of §5.
What the model does not implement is refused instead of ignored: `hidden_act` other than "silu" (the experts are
clamped SwiGLU), `attention_bias` / `mlp_bias` (no V4 linear has a bias), `norm_topk_prob=False` (the router always
renormalises its top-k weights), `router_jitter_noise`, and a YaRN `attention_factor` other than 1 (the reference
does not scale cos / sin: "no mscale", forward-math.md §3.2).
"""

import math
import types
import typing
from typing import Any, NoReturn

from huggingface_hub.errors import StrictDataclassFieldValidationError

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
DEEPSEEK_V4_LAYER_TYPES = (SLIDING, CSA, HCA)
DEFAULT_COMPRESS_RATES = {CSA: 4, HCA: 128}
SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
OPS_BACKENDS = ("auto", "reference", "triton")
EXPERT_DTYPES = ("fp4", "fp8", None)
ROPE_TYPES = ("default", "yarn")
# The official DSpark keys (dspark.md §2.2).
DSPARK_KEYS = ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank")

# Sizes and counts read as tensor dimensions or loop bounds: ints >= 1.
POSITIVE_INTS = (
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
)
CHUNK_SIZES = ("attn_chunk_size", "indexer_chunk_size")
# field -> (lowest allowed, whether the lowest itself is allowed, highest allowed or None); all must be finite.
FLOAT_RANGES = {
    "rms_norm_eps": (0.0, False, None),
    "hc_eps": (0.0, False, None),
    "swiglu_limit": (0.0, False, None),
    "routed_scaling_factor": (0.0, False, None),
    "rope_theta": (0.0, False, None),
    "compress_rope_theta": (0.0, False, None),
    "initializer_range": (0.0, True, None),
    "router_aux_loss_coef": (0.0, True, None),
    "mtp_loss_weight": (0.0, True, None),
    "indexer_loss_weight": (0.0, True, None),
    "attention_dropout": (0.0, True, 1.0),
}
# field -> (the only supported value, why); anything else would be silently ignored by the model.
FIXED = {
    "hidden_act": ("silu", "the experts are clamped SwiGLU (silu gate)"),
    "attention_bias": (False, "no DeepSeek-V4 attention projection has a bias"),
    "mlp_bias": (False, "no DeepSeek-V4 expert or shared-expert projection has a bias"),
    "norm_topk_prob": (True, "the V4 router always renormalises its top-k weights"),
    "router_jitter_noise": (0.0, "router jitter is not implemented"),
    "tie_word_embeddings": (False, "V4 has separate embedding and LM head"),
    "num_key_value_heads": (1, "V4 uses one shared KV head (MQA)"),
}


def message(field: str, value: Any, expected: str) -> str:
    return f"DeepseekV4ExtConfig: invalid `{field}`={value!r}; {expected}."


def fail(field: str, value: Any, expected: str) -> NoReturn:
    raise ValueError(message(field, value, expected))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(field: str, value: Any, minimum: int = 1, why: str = "") -> None:
    if not is_int(value) or value < minimum:
        fail(field, value, f"expected an int >= {minimum}{why}")


def check_number(field: str, value: Any, low: float, low_ok: bool, high: float | None = None) -> None:
    ok = is_number(value) and (value >= low if low_ok else value > low) and (high is None or value <= high)
    if not ok:
        bounds = f"{'>=' if low_ok else '>'} {low}" if high is None else f"in [{low}, {high}]"
        fail(field, value, f"expected a finite number {bounds}")


# ---- wrong JSON types -------------------------------------------------------------------------------------------


class FieldTypeError(StrictDataclassFieldValidationError, ValueError):
    """A config value of the wrong type: a `ValueError` (as every config error) that is still huggingface_hub's
    `StrictDataclassFieldValidationError` for code that catches that."""

    def __init__(self, message: str, field: str | None = None):
        ValueError.__init__(self, message)
        self.field = field


_TYPE_NAMES = {int: "an int", float: "a float", bool: "true or false", str: "a string", type(None): "null"}
_PLURALS = {int: "ints", float: "floats", bool: "booleans", str: "strings"}


def describe_type(annotation: Any) -> str:
    """`int | list[int] | None` -> "an int, a list of ints or null"."""
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    names: list[str] = []
    for arg in typing.get_args(annotation) if union else (annotation,):
        origin = typing.get_origin(arg)
        if origin is list:
            inner = typing.get_args(arg)
            name = f"a list of {_PLURALS.get(inner[0], 'values')}" if inner else "a list"
        elif origin is typing.Literal:
            name = "one of " + ", ".join(map(repr, typing.get_args(arg)))
        elif arg in _TYPE_NAMES:
            name = _TYPE_NAMES[arg]
        elif isinstance(arg, type) and issubclass(arg, dict) or origin is dict:
            name = "a dict"
        else:
            name = getattr(arg, "__name__", str(arg))
        if name not in names:
            names.append(name)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _bad_item(value: list, accepted: tuple) -> str:
    """The first item of `value` that no accepted `list[X]` allows, as ", got '4' (str) at index 2"."""
    kinds = [typing.get_args(arg)[0] for arg in accepted if typing.get_origin(arg) is list and typing.get_args(arg)]
    for index, item in enumerate(value):
        if not any(isinstance(item, kind) and not (isinstance(item, bool) and kind is not bool) for kind in kinds):
            return f", got {item!r} ({type(item).__name__}) at index {index}"
    return ", got list"


def type_error(field: str, value: Any, annotation: Any) -> FieldTypeError:
    accepted = typing.get_args(annotation) or (annotation,)
    got = _bad_item(value, accepted) if isinstance(value, list) else f", got {type(value).__name__}"
    expected = f"expected {describe_type(annotation)}{got}"
    if isinstance(value, str) and int in accepted:
        expected += " (a JSON number, not a quoted string)"
    return FieldTypeError(message(field, value, expected), field)


def clean_type_errors(cls: type) -> type:
    """Class decorator, applied above `@strict`: a failed type check raises `FieldTypeError` in one line."""
    strict_setattr = cls.__setattr__
    fields = cls.__dataclass_fields__

    def __setattr__(self, name: str, value: Any) -> None:
        if is_int(value) and name in fields:
            accepted = typing.get_args(fields[name].type) or (fields[name].type,)
            if float in accepted and int not in accepted:
                value = float(value)  # JSON writes 10.0 as 10 as often as not (e.g. `"routed_scaling_factor": 2`)
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as exc:
            if isinstance(exc, FieldTypeError) or name not in fields:
                raise
            raise type_error(name, value, fields[name].type) from None

    cls.__setattr__ = __setattr__
    return cls


def check_kwargs(kwargs: dict[str, Any]) -> None:
    """Types of the accepted spellings that are not fields (folded in `__post_init__`)."""
    qk = kwargs.get("qk_rope_head_dim")
    if qk is not None and not is_int(qk):
        fail("qk_rope_head_dim", qk, "expected an int (rotary dims of each head)")
    mlp_layer_types = kwargs.get("mlp_layer_types")
    if mlp_layer_types is not None and not isinstance(mlp_layer_types, list):
        fail("mlp_layer_types", mlp_layer_types, 'expected a list of "hash_moe" / "moe"')
    rope_scaling = kwargs.get("rope_scaling")
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        fail("rope_scaling", rope_scaling, 'expected a dict such as {"type": "yarn", "factor": 16, ...} or null')


# ---- attention schedule and DSpark ------------------------------------------------------------------------------


def check_compress_rates(rates: Any) -> None:
    ok = isinstance(rates, dict) and set(rates) == {CSA, HCA}
    ok = ok and all(is_int(v) and v > 0 for v in rates.values())
    if not ok or rates[CSA] == rates[HCA]:
        expected = f"expected exactly these keys, two different positive ints: {DEFAULT_COMPRESS_RATES}"
        fail("compress_rates", rates, expected)


def check_layer_types(config, layer_types: list[str]) -> None:
    if len(layer_types) != config.num_hidden_layers or any(t not in DEEPSEEK_V4_LAYER_TYPES for t in layer_types):
        expected = f"expected {config.num_hidden_layers} (num_hidden_layers) entries from {DEEPSEEK_V4_LAYER_TYPES}"
        fail("layer_types", layer_types, expected)


def check_ratios(config, ratios: list[int]) -> None:
    allowed = (0, config.compress_rates[CSA], config.compress_rates[HCA])
    bad = [r for r in ratios if isinstance(r, bool) or r not in allowed]
    if bad:
        expected = f"entries {bad} are neither 0 (sliding only) nor a rate of compress_rates={config.compress_rates}"
        fail("compress_ratios", ratios, expected + "; set `compress_rates` to the checkpoint's CSA / HCA rates")


def check_schedule(config) -> None:
    check_compress_rates(config.compress_rates)
    for field in ("num_nextn_predict_layers", "dspark_num_stages"):
        check_int(field, getattr(config, field), minimum=0)
    if config.dspark_num_stages and config.num_nextn_predict_layers:
        expected = "a DSpark checkpoint has no MTP block (its mtp.* tensors are the drafter); use 0"
        fail("num_nextn_predict_layers", config.num_nextn_predict_layers, expected)
    n_total = config.num_hidden_layers + config.num_nextn_predict_layers + config.dspark_num_stages
    if config.compress_ratios is None or len(config.compress_ratios) != n_total:
        expected = f"expected {n_total} entries (layers + MTP blocks + DSpark stages)"
        fail("compress_ratios", config.compress_ratios, expected)
    check_ratios(config, config.compress_ratios)
    if config.dspark_num_stages and any(config.compress_ratios[n_total - config.dspark_num_stages :]):
        expected = f"the last {config.dspark_num_stages} entries are the DSpark stages, which are sliding only (0)"
        fail("compress_ratios", config.compress_ratios, expected)
    check_layer_types(config, config.layer_types)
    if list(config.layer_types) != config._types_from_ratios(config.compress_ratios):
        fail("layer_types", config.layer_types, f"it disagrees with `compress_ratios`={config.compress_ratios}")


def check_dspark(config) -> None:
    stages, values = config.dspark_num_stages, {key: getattr(config, key) for key in DSPARK_KEYS}
    check_int("dspark_num_stages", stages, minimum=0)
    if stages == 0:
        given = [key for key, value in values.items() if value is not None]
        if given:
            fail(given[0], values[given[0]], "the dspark_* keys describe a drafter but `dspark_num_stages` is 0")
        return
    for key, value in values.items():
        if value is None:
            fail(key, value, f"a DSpark drafter (dspark_num_stages={stages}) needs all of {list(DSPARK_KEYS)}")
    for key in ("dspark_block_size", "dspark_markov_rank"):
        check_int(key, values[key])
    noise = values["dspark_noise_token_id"]
    if not is_int(noise) or not 0 <= noise < config.vocab_size:
        fail("dspark_noise_token_id", noise, f"expected a token id in [0, {config.vocab_size}) (vocab_size)")
    ids, n = values["dspark_target_layer_ids"], config.num_hidden_layers
    ok = isinstance(ids, list) and len(ids) > 0 and all(is_int(i) and 0 <= i < n for i in ids)
    if not ok or any(a >= b for a, b in zip(ids, ids[1:])):
        fail("dspark_target_layer_ids", ids, f"expected strictly increasing layer ids in [0, {n}) (main layers)")


# ---- RoPE (official `rope_scaling`, native `rope_parameters`; official-format.md §5) ---------------------------


def check_rope_nesting(params: dict) -> None:
    """A `rope_parameters` that names "main" or "compress" must give both as dicts (else it is one flat dict)."""
    labels = [label for label in ("main", "compress") if label in params]
    if labels and not all(isinstance(params.get(label), dict) for label in ("main", "compress")):
        fail("rope_parameters", params, 'expected {"main": {...}, "compress": {...}} (both dicts) or one flat dict')


def check_rope(config) -> None:
    params = config.rope_parameters
    if not isinstance(params, dict) or not all(isinstance(params.get(k), dict) for k in ("main", "compress")):
        fail("rope_parameters", params, 'expected {"main": {...}, "compress": {...}}')
    for label in ("main", "compress"):
        sub, name = params[label], f"rope_parameters['{label}']"
        if sub.get("rope_type") not in ROPE_TYPES:
            fail(f"{name}['rope_type']", sub.get("rope_type"), f"expected one of {ROPE_TYPES}")
        check_number(f"{name}['rope_theta']", sub.get("rope_theta"), 0.0, False)
        if sub.get("rope_type") != "yarn":
            continue
        check_number(f"{name}['factor']", sub.get("factor"), 0.0, False)
        omax = sub.get("original_max_position_embeddings")
        check_int(f"{name}['original_max_position_embeddings']", omax, why=" (context length before YaRN)")
        for beta in ("beta_fast", "beta_slow"):
            if sub.get(beta) is not None:
                check_number(f"{name}['{beta}']", sub[beta], 0.0, False)
        beta_fast, beta_slow = sub.get("beta_fast") or 32, sub.get("beta_slow") or 1
        if beta_fast < beta_slow:
            fail(f"{name}['beta_fast']", beta_fast, f"expected >= beta_slow ({beta_slow})")
        if sub.get("attention_factor") not in (None, 1, 1.0):
            expected = "expected 1.0 (or unset): V4 does not scale cos / sin by YaRN's mscale"
            fail(f"{name}['attention_factor']", sub["attention_factor"], expected)


# ---- everything -------------------------------------------------------------------------------------------------


def check_token_ids(config) -> None:
    vocab = config.vocab_size
    for field in ("bos_token_id", "pad_token_id", "eos_token_id"):
        value = getattr(config, field)
        ids = value if isinstance(value, list) and field == "eos_token_id" else [value]
        if value is not None and not all(is_int(i) and 0 <= i < vocab for i in ids):
            what = "null, a token id or a list of token ids" if field == "eos_token_id" else "null or a token id"
            fail(field, value, f"expected {what} in [0, {vocab}) (vocab_size)")


def check_values(config) -> None:
    """All value rules; the config is already normalised (`__post_init__`) or was edited since (`validate()`)."""
    check_schedule(config)
    for field in POSITIVE_INTS:
        check_int(field, getattr(config, field))
    for field in CHUNK_SIZES:
        check_int(field, getattr(config, field), why=" (query rows processed per chunk)")
    for field, (low, low_ok, high) in FLOAT_RANGES.items():
        check_number(field, getattr(config, field), low, low_ok, high)
    for field, (allowed, why) in FIXED.items():
        if getattr(config, field) != allowed:
            fail(field, getattr(config, field), f"{why}; use {allowed!r}")
    check_dspark(config)
    qk, heads, n_routed, n_layers = (
        config.qk_rope_head_dim,
        config.num_attention_heads,
        config.n_routed_experts,
        config.num_hidden_layers,
    )
    index_dim, max_pos, n_hash = config.index_head_dim, config.max_position_embeddings, config.num_hash_layers
    checks = (
        (heads % config.o_groups == 0, "o_groups", f"it must divide num_attention_heads ({heads})"),
        (
            qk > 0 and qk % 2 == 0 and qk <= min(config.head_dim, index_dim),
            "qk_rope_head_dim",
            f"expected even, in [2, min(head_dim, index_head_dim) = {min(config.head_dim, index_dim)}]; "
            "adjust `partial_rotary_factor`",
        ),
        (config.sliding_window <= max_pos, "sliding_window", f"expected <= max_position_embeddings ({max_pos})"),
        (
            not config.reference_numerics or index_dim & (index_dim - 1) == 0,
            "index_head_dim",
            "reference_numerics rotates indexer queries / keys by a Hadamard transform; use a power of two",
        ),
        (
            1 <= config.num_experts_per_tok <= n_routed,
            "num_experts_per_tok",
            f"expected 1..{n_routed} (n_routed_experts)",
        ),
        (is_int(n_hash) and 0 <= n_hash <= n_layers, "num_hash_layers", f"expected 0..{n_layers} (num_hidden_layers)"),
        (config.n_shared_experts in (0, 1), "n_shared_experts", "V4 has one shared expert per layer; use 1 (or 0)"),
        (config.scoring_func in SCORING_FUNCS, "scoring_func", f"expected one of {SCORING_FUNCS}"),
        (config.ops_backend in OPS_BACKENDS, "ops_backend", f"expected one of {OPS_BACKENDS}"),
        (config.expert_dtype in EXPERT_DTYPES, "expert_dtype", f"expected one of {EXPERT_DTYPES}"),
    )
    for ok, field, expected in checks:
        if not ok:
            fail(field, getattr(config, field), expected)
    check_rope(config)
    check_token_ids(config)
