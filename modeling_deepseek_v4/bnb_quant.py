"""bitsandbytes 4-bit (NF4 / FP4) storage for the weights bitsandbytes does not quantize by itself.

`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` runs transformers'
`replace_with_bnb_linear`, which swaps only modules whose type *is exactly* `nn.Linear` (hf-integration.md §9): the
routed experts (3-D `mlp.experts.gate_up_proj [E, 2I, d]` / `down_proj [E, d, I]`, most of the bytes) and the grouped
`o_a_proj` (deliberately not an `nn.Linear`) would stay dense. `DeepseekV4ExtPreTrainedModel.from_pretrained` calls
`apply_bnb_to_custom_weights` after loading, which swaps in:
- `DeepseekV4Bnb4bitExperts`: each expert quantized on its own by `bitsandbytes.functional.quantize_4bit` (blocks of
  64, one fp32 absmax each, zero padded per expert). The ops get `PackedWeight` values in a `Bnb4bitFormat`
  (`BNB_FORMATS`, the same seam as FP8 / FP4) whose indexing dequantizes only the selection: only experts that get
  tokens are dequantized.
- `DeepseekV4Bnb4bitGroupedLinear`: the `o_a_proj` weight stored the same way, dequantized per forward.
Quant type from `bnb_4bit_quant_type`, compute dtype from `bnb_4bit_compute_dtype` (as `Linear4bit`: input cast to
it, weight dequantized to it). `bnb_4bit_use_double_quant` only affects the `Linear4bit` layers.

Stays full precision: norms, the router `mlp.gate`, the mHC `attn_hc` / `ffn_hc` / `hc_head`, sinks, embeddings,
`lm_head`, and the compressor / indexer `kv_proj` / `gate_proj`. transformers 5.23 hands bitsandbytes
`_keep_in_fp32_modules` but not `_keep_in_fp32_modules_strict` (where those projections are listed), so
`from_pretrained` adds them to `llm_int8_skip_modules` (`with_dense_modules`).

Limits: the experts are loaded dense and quantized right after (peak memory = the dense model); `save_pretrained`
raises (use `model.dequantize()` first, or save a PEFT adapter); PEFT `target_parameters` cannot target the 4-bit
banks. Without bitsandbytes this module imports and `apply_bnb_to_custom_weights` raises an ImportError saying so.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .attention import DeepseekV4GroupedLinear
from .moe import DeepseekV4Experts
from .quantized_modules import _KeepsStorageDtype
from .reference_numerics import carry_numerics
from .weight_formats import PackedWeight, WeightFormat, grouped_linear


class _LazyBnb:
    """`bitsandbytes`, imported on first use: importing it loads native libraries (and logs about optional CPU
    kernels), which a model that never uses 4-bit should not pay for. `module` is None when it is not installed."""

    _module = False

    @property
    def module(self):
        if _LazyBnb._module is False:
            try:
                import bitsandbytes
                import bitsandbytes.functional  # noqa: F401
            except ImportError:  # optional dependency
                bitsandbytes = None
            _LazyBnb._module = bitsandbytes
        return _LazyBnb._module


_lazy = _LazyBnb()

logger = logging.getLogger(__name__)

BLOCKSIZE = 64


def bnb_4bit_available() -> tuple[bool, str]:
    """(True, "") when bitsandbytes can quantize and dequantize 4-bit on CPU here, else (False, the reason)."""
    bnb = _lazy.module
    if bnb is None:
        return False, "bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        packed, state = bnb.functional.quantize_4bit(torch.ones(BLOCKSIZE), blocksize=BLOCKSIZE, quant_type="nf4")
        bnb.functional.dequantize_4bit(packed, state)
    except Exception as err:  # no CUDA and no CPU kernels, broken build, ...
        return False, f"bitsandbytes {bnb.__version__} cannot run 4-bit (de)quantization on CPU: {err}"
    return True, ""


def _bnb_config(quantization_config) -> dict | None:
    """A bitsandbytes config (a `BitsAndBytesConfig` or its dict) as a dict, None for anything else."""
    if quantization_config is None:
        return None
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    method = str(getattr(quantization_config.get("quant_method"), "value", quantization_config.get("quant_method")))
    return quantization_config if method == "bitsandbytes" else None


def bnb_4bit_settings(quantization_config) -> tuple[str, torch.dtype] | None:
    """(quant type, compute dtype) of a bitsandbytes 4-bit config (a `BitsAndBytesConfig` or its dict), else None."""
    config = _bnb_config(quantization_config)
    if config is None or not config.get("load_in_4bit"):
        return None
    dtype = config.get("bnb_4bit_compute_dtype") or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return config.get("bnb_4bit_quant_type") or "fp4", dtype


def is_bnb_8bit(quantization_config) -> bool:
    """True for a bitsandbytes 8-bit config (a `BitsAndBytesConfig` or its dict)."""
    config = _bnb_config(quantization_config)
    return config is not None and bool(config.get("load_in_8bit"))


def with_dense_modules(quantization_config, keep_dense) -> object:
    """A copy of a bitsandbytes 4-bit or 8-bit config whose `llm_int8_skip_modules` also holds `keep_dense` and
    `lm_head`.

    transformers (5.23) gives bitsandbytes `_keep_in_fp32_modules` but not `_keep_in_fp32_modules_strict`, and an
    explicit skip list drops its default `lm_head` skip. The compressor / indexer projections and `lm_head` must stay
    dense: the model casts their input to `weight.dtype`, which for a 4-bit (uint8) or 8-bit (int8) weight gives
    garbage without an error (measured: 25% logit error on the tiny model in 8-bit).
    """
    if bnb_4bit_settings(quantization_config) is None and not is_bnb_8bit(quantization_config):
        return quantization_config
    config = dict(quantization_config) if isinstance(quantization_config, dict) else copy.deepcopy(quantization_config)
    skip = config.get("llm_int8_skip_modules") if isinstance(config, dict) else config.llm_int8_skip_modules
    skip = list(dict.fromkeys([*(skip or []), "lm_head", *keep_dense]))
    if isinstance(config, dict):
        config["llm_int8_skip_modules"] = skip
    else:
        config.llm_int8_skip_modules = skip
    return config


@dataclass(frozen=True)
class Bnb4bitFormat(WeightFormat):
    """bitsandbytes 4-bit (`quant_type` "nf4" / "fp4"): each leading index (expert) of a dense `[..., N, K]` is
    flattened, zero padded to a multiple of 64 values and quantized by `bitsandbytes.functional.quantize_4bit`:
    data uint8 `[..., P/2]` (two codes per byte), scale fp32 absmax `[..., P/64]`, `P` = N*K rounded up to 64.
    The flat storage does not determine (N, K): `PackedWeight` carries the dense shape."""

    quant_type: str = "nf4"

    def storage_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-2], _padded(shape) // 2)

    def dense_shape(self, storage_shape: tuple[int, ...]) -> tuple[int, ...]:
        raise ValueError(f"{self.key} stores each matrix flat and padded: pass the dense shape to PackedWeight")

    def scale_shape(self, shape: tuple[int, ...], halves: int = 1) -> tuple[int, ...]:
        return (*shape[:-2], _padded(shape) // BLOCKSIZE)

    def quantize(self, w, scale_dtype=torch.float32, halves=1) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense `[..., N, K]` -> (packed uint8, fp32 absmax); one matrix at a time, so the fp32 working copy stays
        one expert big. (bitsandbytes blocks ignore row halves: a block may span both.)"""
        lead = w.shape[:-2]
        packed, absmax = [], []
        for matrix in w.detach().reshape(-1, *w.shape[-2:]):
            row = nn.functional.pad(matrix.float().flatten(), (0, -matrix.numel() % BLOCKSIZE))
            q, state = _lazy.module.functional.quantize_4bit(row, blocksize=BLOCKSIZE, quant_type=self.quant_type)
            packed.append(q.view(-1))
            absmax.append(state.absmax.float())
        return torch.stack(packed).view(*lead, -1), torch.stack(absmax).view(*lead, -1)

    def dequantize(self, data, scale, dtype=torch.float32, halves=1, matrix=None) -> torch.Tensor:
        """`[..., P/2]` + `[..., P/64]` -> `[..., N, K]` in `dtype` (`matrix` = (N, K), required)."""
        if matrix is None:
            raise ValueError(f"{self.key}: dequantize needs the dense (N, K) of the flat storage")
        lead, padded = data.shape[:-1], 2 * data.shape[-1]
        state = _lazy.module.functional.QuantState(
            absmax=scale.reshape(-1),
            shape=torch.Size((data.numel() * 2,)),
            code=_lazy.module.functional.get_4bit_type(self.quant_type, device=data.device),
            blocksize=BLOCKSIZE,
            quant_type=self.quant_type,
            dtype=dtype,
        )
        dense = _lazy.module.functional.dequantize_4bit(data.reshape(-1), state).view(*lead, padded)
        return dense[..., : matrix[0] * matrix[1]].reshape(*lead, *matrix)

    def describe(self) -> str:
        return f"{self.quant_type} (bitsandbytes, blocks of {BLOCKSIZE})"


def _padded(shape: tuple[int, ...]) -> int:
    return -(-shape[-2] * shape[-1] // BLOCKSIZE) * BLOCKSIZE


# bitsandbytes' two 4-bit types as weight formats (not in `weight_formats.FORMATS`: the official layout never
# stores them, so `dsv4_quantization` does not name them)
BNB_FORMATS = {
    q: Bnb4bitFormat(f"bnb_{q}", torch.uint8, (1, BLOCKSIZE), per_element=2, quant_type=q) for q in ("nf4", "fp4")
}


class _Bnb4bitStorage(_KeepsStorageDtype, nn.Module):
    """Holds `<name>` (packed uint8) + `<name>_absmax` (fp32) buffers in a `Bnb4bitFormat`; dtype casts leave them
    alone."""

    def _store(self, name: str, w: torch.Tensor) -> None:
        packed, absmax = self.format.quantize(w)
        self.register_buffer(name, packed.to(w.device))
        self.register_buffer(name + "_absmax", absmax.to(w.device))
        self._shapes[name] = tuple(w.shape)

    @property
    def quant_type(self) -> str:
        return self.format.quant_type

    def weight_view(self, name: str, dtype: torch.dtype | None = None) -> PackedWeight:
        data, absmax = getattr(self, name), getattr(self, name + "_absmax")
        return PackedWeight(data, absmax, self.format, dtype or self.compute_dtype, shape=self._shapes[name])


class DeepseekV4Bnb4bitExperts(_Bnb4bitStorage):
    """Routed experts with 4-bit banks: `gate_up_proj` uint8 `[E, P/2]` (+ `gate_up_proj_absmax [E, P/64]`) for
    the dense `[E, 2I, d]`, same for `down_proj` `[E, d, I]`. Forward as `DeepseekV4Experts` in the compute dtype."""

    _quantized_buffers = ("gate_up_proj", "gate_up_proj_absmax", "down_proj", "down_proj_absmax")

    def __init__(self, experts: DeepseekV4Experts, quant_type: str, compute_dtype: torch.dtype):
        super().__init__()
        self.num_experts, self.limit, self.backend = experts.num_experts, experts.limit, experts.backend
        carry_numerics(self, experts)
        self.format, self.compute_dtype, self._shapes = BNB_FORMATS[quant_type], compute_dtype, {}
        self.dense_nbytes = experts.gate_up_proj.nbytes + experts.down_proj.nbytes
        self._store("gate_up_proj", experts.gate_up_proj)
        self._store("down_proj", experts.down_proj)

    forward = DeepseekV4Experts.forward  # with `compute_dtype` set, x is cast to it first

    @property
    def qweight(self) -> torch.Tensor:
        """The packed gate/up bank: PEFT reads `qweight` for the device of a quantized layer it wraps."""
        return self.gate_up_proj

    def expert_banks(self, dtype: torch.dtype) -> tuple[PackedWeight, PackedWeight]:
        return self.weight_view("gate_up_proj"), self.weight_view("down_proj")

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense `[E, 2I, d]`, `[E, d, I]` in `dtype`."""
        return self.weight_view("gate_up_proj", dtype).dequantize(), self.weight_view("down_proj", dtype).dequantize()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, {self.quant_type} blocks of {BLOCKSIZE}, compute {self.compute_dtype}"


class DeepseekV4Bnb4bitGroupedLinear(_Bnb4bitStorage):
    """Grouped `o_a_proj` with a 4-bit weight: `weight` uint8 `[1, P/2]` (+ `weight_absmax [1, P/64]`) for the dense
    `[g * d_g, H * D / g]`; dequantized to the compute dtype per forward."""

    _quantized_buffers = ("weight", "weight_absmax")

    def __init__(self, linear: DeepseekV4GroupedLinear, quant_type: str, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.n_groups = linear.in_features, linear.out_features, linear.n_groups
        self.format, self.compute_dtype, self._shapes = BNB_FORMATS[quant_type], compute_dtype, {}
        self.dense_nbytes = linear.weight.nbytes
        self._store("weight", linear.weight.unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., g, H * D / g]` -> `[..., g * d_g]` in x.dtype."""
        return grouped_linear(x.to(self.compute_dtype), self.weight_view("weight")[0], self.n_groups).to(x.dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_view("weight", dtype)[0]

    def extra_repr(self) -> str:
        return f"groups={self.n_groups}, in_per_group={self.in_features}, out={self.out_features}, {self.quant_type}"


def _check_cpu_linear4bit(model: nn.Module) -> None:
    """Work around / flag two bitsandbytes 0.50.2 CPU issues of `Linear4bit` that only tiny shapes hit (every real
    V4 in/out width is a multiple of 64):
    - the AVX512-BF16 repack at the first no-grad eval forward crashes unless in % 64 == 0 and out % 32 == 0: such
      layers are kept on the generic CPU path;
    - the CPU `dequantize_4bit` kernel applies the 64-blocks per row, so a weight with in % 64 != 0 is dequantized
      wrong (~20-40% error instead of ~10%): logged as a warning, since it cannot be fixed from here.
    (This module's own banks are dequantized flat, which that kernel handles correctly.)"""
    misdequantized = []
    for name, module in model.named_modules():
        if not isinstance(module, _lazy.module.nn.Linear4bit) or module.weight.device.type != "cpu":
            continue
        if module.in_features % BLOCKSIZE or module.out_features % 32:
            module.support_avx512bf16_for_cpu = False
        if module.in_features % BLOCKSIZE:
            misdequantized.append(name)
    if misdequantized:
        logger.warning(
            "bitsandbytes %s on CPU dequantizes 4-bit weights whose input width is not a multiple of %d incorrectly; "
            "affected: %s",
            _lazy.module.__version__,
            BLOCKSIZE,
            ", ".join(misdequantized[:3])
            + (f" and {len(misdequantized) - 3} more" if len(misdequantized) > 3 else ""),
        )


@torch.no_grad()
def dequantize_custom_weights(model: nn.Module, dtype: torch.dtype | str | None = None) -> int:
    """Swap the 4-bit banks / `o_a_proj` of `model` back to dense `DeepseekV4Experts` / `DeepseekV4GroupedLinear`
    (in `dtype`, default fp32). Called by `model.dequantize()`. Returns how many modules were swapped."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
    swapped = 0
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, DeepseekV4Bnb4bitExperts):
                with torch.device("meta"):
                    dense = DeepseekV4Experts(model.config)
                dense.backend = carry_numerics(dense, child).backend
                gate_up, down = child.dequantized(dtype)
                dense.gate_up_proj, dense.down_proj = nn.Parameter(gate_up), nn.Parameter(down)
            elif isinstance(child, DeepseekV4Bnb4bitGroupedLinear):
                with torch.device("meta"):
                    dense = DeepseekV4GroupedLinear(child.in_features, child.out_features, child.n_groups)
                dense.weight = nn.Parameter(child.dequantized_weight(dtype))
            else:
                continue
            setattr(module, attr, dense)
            swapped += 1
    return swapped


def _get_state_dict_and_metadata(self, model):
    if getattr(model, "_hf_peft_config_loaded", False):  # transformers-side adapter: only the adapter is saved
        return super(type(self), self).get_state_dict_and_metadata(model)
    raise NotImplementedError(
        "This DeepSeek-V4 model was loaded in bitsandbytes 4-bit with its routed experts / o_a_proj stored as 4-bit "
        "banks (modeling_deepseek_v4/bnb_quant.py), which save_pretrained cannot write in a reloadable form. Save "
        "the unquantized checkpoint and quantize at load time (from_pretrained with quantization_config), save only "
        "a PEFT adapter (peft_model.save_pretrained), or call model.dequantize() first."
    )


def _dequantize(self, model, dtype=None):
    model = super(type(self), self)._dequantize(model, dtype=dtype)
    dequantize_custom_weights(model, dtype)
    return model


def _guard_quantizer(model: nn.Module) -> None:
    """Subclass `model.hf_quantizer` in place: `save_pretrained` raises (the 4-bit banks would be written under the
    dense names with packed shapes, which the dense module tree cannot reload; PEFT adapter saving is unaffected),
    and `model.dequantize()` also restores the dense experts / `o_a_proj`."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer, "_dsv4_guarded", False):
        return
    methods = {"get_state_dict_and_metadata": _get_state_dict_and_metadata, "_dequantize": _dequantize}
    quantizer.__class__ = type(type(quantizer).__name__, (type(quantizer),), {**methods, "_dsv4_guarded": True})


@torch.no_grad()
def apply_bnb_to_custom_weights(model: nn.Module, quantization_config) -> dict:
    """Quantize the routed experts and grouped `o_a_proj` of a loaded model to bitsandbytes 4-bit in place.

    `quantization_config`: a 4-bit `BitsAndBytesConfig` or its dict (anything else: nothing happens); modules named in
    its `llm_int8_skip_modules` stay dense. Returns counts and bytes: `linear4bit` (bnb `Linear4bit` modules in the
    model), `expert_banks`, `grouped_linears` (converted here), `dense_bytes` / `quantized_bytes` (of the converted
    weights before / after).
    """
    settings = bnb_4bit_settings(quantization_config)
    if settings is None:
        return {}
    ok, reason = bnb_4bit_available()
    if not ok:
        raise ImportError(f"DeepSeek-V4 bitsandbytes 4-bit loading is not possible: {reason}.")
    from transformers.quantizers.quantizers_utils import should_convert_module

    quant_type, compute_dtype = settings
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    skip = quantization_config.get("llm_int8_skip_modules")
    kinds = {
        DeepseekV4Experts: (DeepseekV4Bnb4bitExperts, "expert_banks"),
        DeepseekV4GroupedLinear: (DeepseekV4Bnb4bitGroupedLinear, "grouped_linears"),
    }
    counts = {"linear4bit": 0, "expert_banks": 0, "grouped_linears": 0, "dense_bytes": 0, "quantized_bytes": 0}
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            full = f"{name}.{attr}" if name else attr
            if type(child) not in kinds or (skip and not should_convert_module(full, list(skip))):
                continue
            if any(p.is_meta for p in child.parameters()):
                raise NotImplementedError(f"{full} is offloaded (meta tensors); 4-bit experts need it in memory")
            new_class, key = kinds[type(child)]
            new = new_class(child, quant_type, compute_dtype)
            setattr(module, attr, new)
            counts[key] += 1
            counts["dense_bytes"] += new.dense_nbytes
            counts["quantized_bytes"] += new.quantized_nbytes()
    counts["linear4bit"] = sum(isinstance(m, _lazy.module.nn.Linear4bit) for m in model.modules())
    _check_cpu_linear4bit(model)
    _guard_quantizer(model)
    logger.info("DeepSeek-V4 bitsandbytes 4-bit (%s): %s", quant_type, counts)
    return counts


__all__ = [
    "BNB_FORMATS",
    "Bnb4bitFormat",
    "DeepseekV4Bnb4bitExperts",
    "DeepseekV4Bnb4bitGroupedLinear",
    "apply_bnb_to_custom_weights",
    "bnb_4bit_available",
    "bnb_4bit_settings",
    "dequantize_custom_weights",
    "with_dense_modules",
]
