"""DeepSeek-V4 configuration: every hyper-parameter of a V4-Flash / V4-Pro model and of the plugin's runtime.

Field names, defaults (V4-Flash sizes) and meaning follow transformers' native config
(`transformers/models/deepseek_v4/configuration_deepseek_v4.py`, 5.23). Three spellings are accepted and
normalised to one stored form, so equal meaning gives equal configs:

- the plugin's own saved `config.json` (`__post_init__` is idempotent);
- a native `deepseek_v4` dict (`layer_types`, `mlp_layer_types`, nested `rope_parameters`, `partial_rotary_factor`);
- the official root `config.json` of `deepseek-ai/DeepSeek-V4-Flash` / `-Pro` (`compress_ratios` with the trailing
  MTP entry, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`, `expert_dtype`, `quantization_config`).
  The reference `inference/config.json` (`ModelArgs` names: `dim`, `n_layers`, ...) is refused; use the root file.

Stored form. `compress_ratios` (one entry per decoder layer, then one per MTP block; 0 = sliding window only,
`compress_rates[...]` = CSA / HCA) is the authoritative attention schedule; `layer_types` is derived from it with
the standard transformers names, so the base `PreTrainedConfig` validator (used by `Trainer` resume) accepts the
file. Hash routing is stored as `num_hash_layers`, never as native's `mlp_layer_types`, whose `"hash_moe"` values
the base validator rejects. `rope_parameters` uses native's `{"main": ..., "compress": ...}` nesting and
`rope_scaling` is never stored.

Documented deviations from native (forward-math.md §10 row 13): without `compress_ratios` / `layer_types` the
default schedule is the official V4-Flash pattern (sliding, sliding, then CSA on even and HCA on odd layers), not
native's HCA, HCA, then alternating from HCA; without any rope settings the compressed layers get the official YaRN
(factor 16 over 65536, beta 32 / 1), not native's unscaled default. `expert_dtype` stays a top-level field and is
not copied into `quantization_config` (native >= 5.21 copies it). DeepSeek-V4.1 (`deepseek_v41`) is refused.

DSpark (`DeepSeek-V4-Flash-0731` / `-Flash-DSpark`; dspark.md §2.2, official-format.md §11): the `dspark_*` keys
(also a nested `dspark_config` dict and an unprefixed `markov_rank`, as SGLang accepts them) describe the drafter
that these releases keep under `mtp.*` instead of the MTP block. With them, `num_nextn_predict_layers` is stored as
0 (the official files keep a stale 1) and `dspark_num_stages` counts the drafter's blocks, which take the trailing
`compress_ratios` entries (all 0: sliding window only).

Validation: every value rule (sizes, ranges, unsupported options, wrong JSON types) is in `config_checks.py`; it runs
at the end of `__post_init__` and again through `validate()`.
"""

import copy
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .config_checks import (
    CSA,
    DEFAULT_COMPRESS_RATES,
    DSPARK_KEYS,
    HCA,
    ROPE_TYPES,
    SLIDING,
    check_compress_rates,
    check_int,
    check_kwargs,
    check_layer_types,
    check_ratios,
    check_rope,
    check_rope_nesting,
    check_schedule,
    check_values,
    clean_type_errors,
    fail,
    is_number,
)
from .parallel_plans import BASE_MODEL_EP_PLAN, BASE_MODEL_FSDP_PLAN, BASE_MODEL_PP_PLAN, BASE_MODEL_TP_PLAN

DEFAULT_NUM_HASH_LAYERS = 3
# `qk_rope_head_dim` (64) / `head_dim` (512), as native.
DEFAULT_PARTIAL_ROTARY_FACTOR = 64 / 512
ACCEPTED_MODEL_TYPES = (None, "deepseek_v4", "deepseek_v4_ext")
# Keys that only the reference `inference/config.json` (`ModelArgs`) uses.
_MODEL_ARGS_KEYS = ("dim", "n_layers", "n_heads", "moe_inter_dim", "n_activated_experts", "n_hash_layers")
# The names SGLang also accepts inside a nested `dspark_config`, for the official DSpark keys (dspark.md §2.2).
_DSPARK_NESTED = {
    "block_size": "dspark_block_size",
    "noise_token_id": "dspark_noise_token_id",
    "mask_token_id": "dspark_noise_token_id",
    "target_layer_ids": "dspark_target_layer_ids",
    "markov_rank": "dspark_markov_rank",
    **{key: key for key in DSPARK_KEYS},
}


# `rope_scaling` of the official root config.json (official-format.md §3), used when a config gives none.
OFFICIAL_COMPRESS_YARN = {
    "rope_type": "yarn",
    "factor": 16,
    "original_max_position_embeddings": 65536,
    "beta_fast": 32,
    "beta_slow": 1,
}


def official_compress_ratios(
    num_hidden_layers: int, num_nextn_predict_layers: int = 1, compress_rates: dict[str, int] | None = None
) -> list[int]:
    """The official V4-Flash schedule: layers 0-1 sliding only, then CSA on even and HCA on odd layers; MTP 0."""
    rates = compress_rates or DEFAULT_COMPRESS_RATES
    ratios = [0 if i < 2 else rates[CSA] if i % 2 == 0 else rates[HCA] for i in range(num_hidden_layers)]
    return ratios + [0] * num_nextn_predict_layers


def _check_foreign_input(kwargs: dict[str, Any]) -> None:
    model_type = kwargs.get("model_type")
    if model_type == "deepseek_v41" or "text_config" in kwargs or "vision_config" in kwargs:
        raise ValueError(
            f"DeepseekV4ExtConfig: `model_type`={model_type!r} with `text_config` / `vision_config` is DeepSeek-V4.1, "
            "a different architecture (Engram memory, cross-layer KV sharing, vision tower); it is out of scope for "
            "this package. Use a DeepSeek-V4 (Flash / Pro) checkpoint."
        )
    if model_type not in ACCEPTED_MODEL_TYPES:
        fail("model_type", model_type, f"expected one of {ACCEPTED_MODEL_TYPES[1:]}")
    found = [key for key in _MODEL_ARGS_KEYS if key in kwargs]
    if found:
        raise ValueError(
            f"DeepseekV4ExtConfig: got reference `ModelArgs` keys {found}: this is `inference/config.json`. Load the "
            "root `config.json` of the checkpoint instead (HF-style names, official-format.md §3)."
        )


@clean_type_errors
@strict
class DeepseekV4ExtConfig(PreTrainedConfig):
    r"""Configuration of a DeepSeek-V4 causal LM (`model_type="deepseek_v4_ext"`); defaults are V4-Flash.

    Sizes: `vocab_size`, `hidden_size`, `moe_intermediate_size` (alias `intermediate_size`), `num_hidden_layers`,
        `num_attention_heads`, `num_key_value_heads` (always 1: shared-KV MQA), `head_dim`, `q_lora_rank`.
    Attention: `sliding_window` (n_win), `o_groups` / `o_lora_rank` (grouped output projection), `attention_bias`,
        `attention_dropout`, `index_n_heads` / `index_head_dim` / `index_topk` (Lightning Indexer of CSA layers).
    Compression schedule: `compress_ratios` (authoritative, `num_hidden_layers + num_nextn_predict_layers` entries;
        a list of `num_hidden_layers` entries gets a 0 appended per MTP block), `compress_rates` (CSA / HCA rate),
        `layer_types` (derived: 0 -> sliding, CSA rate -> CSA, HCA rate -> HCA). Legacy `compress_rate_csa` /
        `compress_rate_hca` kwargs fold into `compress_rates`.
    RoPE: `rope_theta` (main), `compress_rope_theta` (CSA / HCA branches), `partial_rotary_factor` (from an official
        `qk_rope_head_dim` when given), `rope_parameters` (native nesting `{"main", "compress"}`; an official
        `rope_scaling` becomes the compress entry with `attention_factor` 1.0 for YaRN), `max_position_embeddings`.
        A nested `rope_parameters` is authoritative for the thetas (as in native); the scalar fields are synced.
        Runtime attribute `qk_rope_head_dim = int(head_dim * partial_rotary_factor)`.
    mHC: `hc_mult` (n_hc), `hc_sinkhorn_iters`, `hc_eps`.
    MoE: `n_routed_experts` (aliases `num_local_experts`, `num_experts`), `n_shared_experts` (0 or 1),
        `num_experts_per_tok`, `scoring_func`, `norm_topk_prob`, `routed_scaling_factor`, `swiglu_limit`, `hidden_act`,
        `mlp_bias`, `num_hash_layers` (leading hash-routed layers; None resolves to min(3, num_hidden_layers); a
        native `mlp_layer_types` kwarg folds into it), `output_router_logits`, `router_aux_loss_coef`, `seq_aux`
        (the balance loss per sequence, DeepSeek's, or over the whole batch; `losses.py`), `router_jitter_noise`.
    MTP: `num_nextn_predict_layers`; `mtp_loss_weight` (training: with `labels`, add this weight x the MTP block's
        next-next-token loss, reported as `mtp_loss`; 0 = off). `indexer_loss_weight` (training: > 0 adds the
        indexer alignment KL of the CSA layers, `indexer_alignment.py`, reported as `indexer_loss`; 0 = off).
    DSpark drafter (dspark.md §2.2): `dspark_num_stages` (blocks of the drafter, `model.dspark.layers`; 0 = none;
        with `dspark_*` keys and 0 it is taken from the trailing `compress_ratios` entries), `dspark_block_size` (W,
        drafted tokens per block), `dspark_noise_token_id` (token filling the draft slots), `dspark_target_layer_ids`
        (main layers whose outputs feed `main_proj`), `dspark_markov_rank` (rank r of the Markov head). A nested
        `dspark_config` dict and an unprefixed `markov_rank` kwarg fold into them. Exclusive with MTP.
    Quantization: `expert_dtype` ("fp4", "fp8" or None: format of the routed experts in the checkpoint);
        `quantization_config` is kept verbatim as an extra attribute (not a field). `dsv4_quantization`: layout
        of weights kept quantized in memory (`quantized_modules.QuantizationLayout`: FP8 linears, FP4 / FP8 routed
        experts, scale dtype); None = dense. Deliberately not `quantization_config`, which transformers would hand
        to its own FP8 quantizer. `reference_numerics`: reproduce the official forward's simulated quantization
        (forward-math.md §9 R1-R4: FP8 activations before FP8/FP4 linears, FP8 KV round trip, Hadamard + FP4
        indexer, bf16 index scores); off by default.
    Plugin runtime: `attn_chunk_size` (query chunk of the memory-bounded attention), `indexer_chunk_size` (query
        chunk of the indexer scoring), `ops_backend` ("auto", "reference" or "triton").
    Standard: `initializer_range`, `rms_norm_eps`, `use_cache`, token ids, `tie_word_embeddings` (always False).
    """

    model_type = "deepseek_v4_ext"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Standard MoE names read by FP8 / TP integrations and by `LlamaMLP`-style shared experts, as native; TRL's MoE
    # aux-loss path (trainer/utils.py, `add_fused_lm_head`) reads `num_experts` (hf-integration.md §12).
    attribute_map = {
        "num_local_experts": "n_routed_experts",
        "num_experts": "n_routed_experts",
        "intermediate_size": "moe_intermediate_size",
    }
    # `rope_parameters` is keyed by these labels, not by `layer_types` (read by the base RoPE helpers).
    _rope_type_labels = ("main", "compress")
    # transformers' distributed engine (TP / EP / PP / FSDP2), see parallel_plans.py
    base_model_tp_plan = BASE_MODEL_TP_PLAN
    base_model_ep_plan = BASE_MODEL_EP_PLAN
    base_model_pp_plan = BASE_MODEL_PP_PLAN
    base_model_fsdp_plan = BASE_MODEL_FSDP_PLAN

    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 1048576
    rope_theta: float | int = 10000.0

    layer_types: list[str] | None = None
    compress_rates: dict | None = None
    compress_rope_theta: float | int = 160000.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1.0e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 1
    mtp_loss_weight: float = 0.0
    indexer_loss_weight: float = 0.0
    dspark_num_stages: int = 0
    dspark_block_size: int | None = None
    dspark_noise_token_id: int | None = None
    dspark_target_layer_ids: list[int] | None = None
    dspark_markov_rank: int | None = None

    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    seq_aux: bool = True
    router_jitter_noise: float = 0.0

    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1.0e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    partial_rotary_factor: float | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0

    compress_ratios: list[int] | None = None
    num_hash_layers: int | None = None
    expert_dtype: str | None = None
    dsv4_quantization: dict | None = None
    reference_numerics: bool = False
    attn_chunk_size: int = 256
    indexer_chunk_size: int = 256
    ops_backend: str = "auto"

    def __post_init__(self, **kwargs: Any) -> None:
        _check_foreign_input(kwargs)
        check_kwargs(kwargs)
        # `model_type` is a class attribute; an instance copy (e.g. "deepseek_v4") would shadow it.
        kwargs.pop("model_type", None)
        csa_rate = kwargs.pop("compress_rate_csa", None)
        hca_rate = kwargs.pop("compress_rate_hca", None)
        mlp_layer_types = kwargs.pop("mlp_layer_types", None)
        qk_rope_head_dim = kwargs.pop("qk_rope_head_dim", None)
        rope_scaling = kwargs.pop("rope_scaling", None)
        self._resolve_dspark(kwargs.pop("dspark_config", None), kwargs.pop("markov_rank", None))
        for field in ("num_hidden_layers", "head_dim"):
            check_int(field, getattr(self, field))
        for field in ("num_nextn_predict_layers", "dspark_num_stages"):
            check_int(field, getattr(self, field), minimum=0)
        self._resolve_schedule(csa_rate, hca_rate)
        self._resolve_hash_layers(mlp_layer_types)
        self._resolve_rope(qk_rope_head_dim, rope_scaling)
        super().__post_init__(**kwargs)
        check_values(self)

    # ---- normalisation ------------------------------------------------------------------------------------------

    def _resolve_dspark(self, nested: dict | None, markov_rank: int | None) -> None:
        if nested is not None and not isinstance(nested, dict):
            fail("dspark_config", nested, "expected a dict")
        sources = [(f"dspark_config[{k!r}]", _DSPARK_NESTED.get(k), v) for k, v in (nested or {}).items()]
        unknown = [label for label, field, _ in sources if field is None]
        if unknown:
            fail("dspark_config", nested, f"unknown keys {unknown}; expected keys from {sorted(_DSPARK_NESTED)}")
        if markov_rank is not None:
            sources.append(("markov_rank", "dspark_markov_rank", markov_rank))
        for label, field, value in sources:
            if getattr(self, field) is not None and getattr(self, field) != value:
                fail(field, getattr(self, field), f"it disagrees with `{label}`={value!r}")
            setattr(self, field, value)
        if not self.dspark_num_stages and all(getattr(self, key) is None for key in DSPARK_KEYS):
            return
        # The official DSpark files keep a stale `num_nextn_predict_layers: 1`: their mtp.* blocks are the drafter.
        self.num_nextn_predict_layers = 0
        if self.dspark_num_stages == 0:
            extra = len(self.compress_ratios) - self.num_hidden_layers if self.compress_ratios is not None else 0
            if extra < 1:
                fail(
                    "dspark_num_stages",
                    0,
                    "the dspark_* keys need a drafter: set the number of stages, or give `compress_ratios` with one "
                    "trailing entry per stage (the official files do)",
                )
            self.dspark_num_stages = extra

    def _resolve_schedule(self, csa_rate: int | None, hca_rate: int | None) -> None:
        rates = dict(DEFAULT_COMPRESS_RATES if self.compress_rates is None else self.compress_rates)
        if csa_rate is not None:
            rates[CSA] = csa_rate
        if hca_rate is not None:
            rates[HCA] = hca_rate
        check_compress_rates(rates)
        self.compress_rates = rates
        n, n_mtp = self.num_hidden_layers, self.num_nextn_predict_layers + self.dspark_num_stages
        ratio_of = {SLIDING: 0, CSA: rates[CSA], HCA: rates[HCA]}
        if self.compress_ratios is not None:
            ratios = list(self.compress_ratios)
            if len(ratios) == n:
                ratios += [0] * n_mtp
            elif len(ratios) != n + n_mtp:
                expected = (
                    f"expected {n} (layers) or {n + n_mtp} (layers + MTP blocks / DSpark stages) entries, "
                    f"got {len(ratios)}"
                )
                fail("compress_ratios", ratios, expected)
        elif self.layer_types is not None:
            check_layer_types(self, self.layer_types)
            ratios = [ratio_of[t] for t in self.layer_types] + [0] * n_mtp
        else:
            ratios = official_compress_ratios(n, n_mtp, rates)
        check_ratios(self, ratios)
        derived = self._types_from_ratios(ratios)
        if self.layer_types is not None and list(self.layer_types) != derived:
            fail("layer_types", self.layer_types, f"it disagrees with `compress_ratios`={ratios}; pass only one")
        self.compress_ratios = ratios
        self.layer_types = derived

    def _resolve_hash_layers(self, mlp_layer_types: list[str] | None) -> None:
        n = self.num_hidden_layers
        if mlp_layer_types is not None:
            types = list(mlp_layer_types)
            n_hash = types.count("hash_moe")
            if len(types) != n or any(t not in ("hash_moe", "moe") for t in types):
                fail("mlp_layer_types", types, f'expected {n} entries from ("hash_moe", "moe")')
            if types[:n_hash] != ["hash_moe"] * n_hash:
                fail("mlp_layer_types", types, 'V4 hash-routes only its first layers: "hash_moe" must be a prefix')
            if self.num_hash_layers is not None and self.num_hash_layers != n_hash:
                fail("num_hash_layers", self.num_hash_layers, f"it disagrees with `mlp_layer_types` ({n_hash})")
            self.num_hash_layers = n_hash
        elif self.num_hash_layers is None:
            self.num_hash_layers = min(DEFAULT_NUM_HASH_LAYERS, n)

    def _resolve_rope(self, qk_rope_head_dim: int | None, rope_scaling: dict | None) -> None:
        params = copy.deepcopy(self.rope_parameters) if self.rope_parameters else {}
        check_rope_nesting(params)
        nested = isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict)
        factor = self.partial_rotary_factor
        if factor is None:
            if qk_rope_head_dim is not None:
                factor = qk_rope_head_dim / self.head_dim
            elif nested and "partial_rotary_factor" in params["main"]:
                factor = params["main"]["partial_rotary_factor"]
            else:
                factor = DEFAULT_PARTIAL_ROTARY_FACTOR
        if not is_number(factor):
            fail("partial_rotary_factor", factor, "expected a finite number in (0, 1] (rotary share of head_dim)")
        if qk_rope_head_dim is not None and int(self.head_dim * factor) != qk_rope_head_dim:
            fail(
                "qk_rope_head_dim",
                qk_rope_head_dim,
                f"!= head_dim * partial_rotary_factor ({self.head_dim} * {factor})",
            )
        self.partial_rotary_factor = float(factor)
        self.qk_rope_head_dim = int(self.head_dim * factor)

        scaling = _rename_type(copy.deepcopy(rope_scaling)) if rope_scaling else None
        if nested:
            main, compress = _rename_type(params["main"]), _rename_type(params["compress"])
            keys = set(scaling or {}) - {"rope_theta", "partial_rotary_factor"}
            if any(compress.get(k) != scaling[k] for k in keys):
                fail("rope_scaling", rope_scaling, f"it disagrees with rope_parameters['compress']={compress}")
            # Native semantics: the nested dict holds the thetas; keep the scalar fields in sync with it.
            self.rope_theta = main.setdefault("rope_theta", self.rope_theta)
            self.compress_rope_theta = compress.setdefault("rope_theta", self.compress_rope_theta)
        else:
            flat = scaling if scaling is not None else _rename_type(params)
            if scaling is None and not params:
                # Nothing given: the official V4 YaRN of the compressed layers, not native's unscaled default.
                flat = dict(OFFICIAL_COMPRESS_YARN)
            main = {"rope_type": "default", "rope_theta": self.rope_theta}
            compress = {k: v for k, v in flat.items() if k not in self._rope_type_labels}
            compress["rope_theta"] = self.compress_rope_theta
        for label, sub in (("main", main), ("compress", compress)):
            sub.setdefault("rope_type", "default")
            if sub["rope_type"] not in ROPE_TYPES:
                fail(f"rope_parameters['{label}']['rope_type']", sub["rope_type"], f"expected one of {ROPE_TYPES}")
            if sub.setdefault("partial_rotary_factor", self.partial_rotary_factor) != self.partial_rotary_factor:
                fail(f"rope_parameters['{label}']", sub, f"partial_rotary_factor != {self.partial_rotary_factor}")
            if sub["rope_type"] == "yarn":
                if "factor" not in sub:
                    fail(f"rope_parameters['{label}']", sub, 'a "yarn" entry needs a "factor"')
                sub.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        if compress["rope_type"] == "yarn":
            # The V4 reference does not scale cos/sin by YaRN's mscale (native forces the same).
            compress.setdefault("attention_factor", 1.0)
        self.rope_parameters = {"main": main, "compress": compress}

    # ---- validation (runs in `__post_init__`, again through `validate()`; the rules are in config_checks.py) ----

    def _types_from_ratios(self, ratios: list[int]) -> list[str]:
        type_of = {0: SLIDING, self.compress_rates[CSA]: CSA, self.compress_rates[HCA]: HCA}
        return [type_of[r] for r in ratios[: self.num_hidden_layers]]

    def validate_v4_values(self) -> None:
        """`@strict` class validator: re-checks every value, e.g. after attributes were edited."""
        check_values(self)

    def validate_layer_type(self) -> None:
        """Narrows the base check to V4's three attention types and checks them against `compress_ratios`."""
        check_schedule(self)

    def validate_rope(self) -> None:
        """Validates the `main` / `compress` entries separately (the base check expects layer-type keys)."""
        check_rope(self)
        params = self.rope_parameters
        for label in self._rope_type_labels:
            sub = params.get(label)
            if not isinstance(sub, dict):
                continue
            validation_fn = getattr(self, f"_validate_{sub.get('rope_type', 'default')}_rope_parameters", None)
            if validation_fn is None:
                continue
            # The YaRN validator reads `self.rope_parameters[...]` directly, so point it at the sub-dict meanwhile.
            self.rope_parameters = sub
            try:
                validation_fn(sub, ignore_keys=self.ignore_keys_at_rope_validation)
            finally:
                self.rope_parameters = params

    # ---- helpers --------------------------------------------------------------------------------------------------

    def layer_compress_ratio(self, layer_idx: int) -> int:
        """Compression ratio of block `layer_idx` (0: sliding only, else the CSA / HCA rate); MTP blocks or DSpark
        stages last."""
        if not 0 <= layer_idx < len(self.compress_ratios):
            raise IndexError(
                f"layer_idx {layer_idx} is out of range [0, {len(self.compress_ratios)}) (layers + MTP / DSpark)"
            )
        return self.compress_ratios[layer_idx]

    def is_hash_layer(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` routes by the frozen `tid2eid` table; always False for MTP / DSpark blocks."""
        if not 0 <= layer_idx < len(self.compress_ratios):
            raise IndexError(
                f"layer_idx {layer_idx} is out of range [0, {len(self.compress_ratios)}) (layers + MTP / DSpark)"
            )
        return layer_idx < self.num_hash_layers


def _rename_type(params: dict[str, Any]) -> dict[str, Any]:
    """Maps the legacy `type` key of a RoPE dict to `rope_type` (in place) and returns the dict."""
    if "type" in params:
        legacy = params.pop("type")
        params.setdefault("rope_type", legacy)
    return params


__all__ = ["DeepseekV4ExtConfig", "official_compress_ratios"]
