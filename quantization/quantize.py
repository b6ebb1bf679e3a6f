"""Dense <-> quantized in-memory DeepSeek-V4 models (official formats, official-format.md §8).

`quantize_model` applies the official rules (pow2 E8M0 scales; E4M3 128x128 blocks for the FP8 linears; E2M1 1x32
groups for FP4 experts, or per-expert E4M3 128x128 blocks for FP8 experts) and records the layout in
`config.dsv4_quantization`, so `save_pretrained` writes a folder that `from_pretrained` (and the Hub custom code)
loads back quantized. Weights that already sit on the target grid (a model converted from the official checkpoint,
or after `convert_qat`) quantize without any change.
"""

from __future__ import annotations

import torch
from torch import nn

from modeling_deepseek_v4.attention import DeepseekV4GroupedLinear
from modeling_deepseek_v4.moe import DeepseekV4Experts
from modeling_deepseek_v4.quantized_modules import (
    DeepseekV4Fp8GroupedLinear,
    DeepseekV4Fp8Linear,
    DeepseekV4QuantizedExperts,
    QuantizationLayout,
    empty_fp8_like,
    iter_fp8_targets,
)
from modeling_deepseek_v4.reference_numerics import carry_numerics, set_reference_numerics
from modeling_deepseek_v4.weight_formats import FORMATS

QUANTIZED_TYPES = (DeepseekV4Fp8Linear, DeepseekV4Fp8GroupedLinear, DeepseekV4QuantizedExperts)


def _config_of(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "n_routed_experts"):
        raise TypeError(f"expected a DeepSeek-V4 model (with a DeepseekV4ExtConfig), got {type(model).__name__}")
    return config


def _refresh_numerics(model: nn.Module, config) -> nn.Module:
    """Reinstall reference-numerics hooks on the swapped-in modules when the mode is on."""
    if getattr(config, "reference_numerics", False):
        set_reference_numerics(model, True)
    return model


def _expert_owners(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module) and hasattr(m, "gate")]


@torch.no_grad()
def quantize_model(
    model: nn.Module, weights: str | None = "fp8", experts: str | None = "fp4", scale_dtype: str = "float8_e8m0fnu"
) -> nn.Module:
    """Quantize a dense DeepSeek-V4 model in place and return it.

    Args:
        weights: "fp8" (128x128 blocks) or "fp8_block32" (32x32 blocks) turns the linears the official checkpoints
            store in FP8 (`weight_formats.OFFICIAL_FP8_LINEARS`: attention projections incl. the grouped `o_a_proj`,
            indexer `q_b_proj`, shared experts, MTP `e_proj` / `h_proj`) into `DeepseekV4Fp8Linear` /
            `DeepseekV4Fp8GroupedLinear`; None keeps them dense.
        experts: "fp4" (packed E2M1), "fp8" or "fp8_block32" routed-expert banks (`DeepseekV4QuantizedExperts`);
            None keeps them.
        scale_dtype: "float8_e8m0fnu" (official) or "float32".
    Norms, routers, mHC parameters, compressors, the indexer's `weights_proj`, embeddings and the LM head stay dense.
    """
    config = _config_of(model)
    if QuantizationLayout.from_config(config) is not None:
        raise ValueError("this model is already quantized (config.dsv4_quantization is set); dequantize_model() first")
    layout = QuantizationLayout(weights, experts, scale_dtype)
    sdtype = layout.torch_scale_dtype
    if weights is not None:
        fmt = FORMATS[weights]
        for _, owner, attr in list(iter_fp8_targets(model)):
            old = getattr(owner, attr)
            if type(old) not in (nn.Linear, DeepseekV4GroupedLinear):
                raise TypeError(
                    f"cannot quantize {type(old).__name__} at {attr}: expected a dense nn.Linear; merge or remove "
                    "adapters (PEFT `merge_and_unload()`) and QAT wrappers (`convert_qat`) first"
                )
            new = empty_fp8_like(old, sdtype, config.ops_backend, fmt).to(old.weight.device)
            new.load_dense(old.weight)
            setattr(owner, attr, new)
    if experts is not None:
        for owner in _expert_owners(model):
            old = owner.experts
            if type(old) is not DeepseekV4Experts:
                raise TypeError(f"cannot quantize {type(old).__name__}: expected dense DeepseekV4Experts")
            new = DeepseekV4QuantizedExperts(config, experts, sdtype).to(old.gate_up_proj.device)
            carry_numerics(new, old)
            new.load_dense(old.gate_up_proj, old.down_proj)
            owner.experts = new
    config.dsv4_quantization = layout.to_dict()
    return _refresh_numerics(model, config)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized module by its dense equivalent (exact values) in `dtype` (default: the embedding's)
    and clear `config.dsv4_quantization`. Returns the model."""
    config = _config_of(model)
    dtype = dtype or model.get_input_embeddings().weight.dtype
    for owner in list(model.modules()):
        for attr, child in list(owner.named_children()):
            if isinstance(child, DeepseekV4Fp8Linear):
                new = nn.Linear(child.in_features, child.out_features, bias=False, device=child.weight.device)
                new.weight.data = child.dequantized_weight(dtype)
            elif isinstance(child, DeepseekV4Fp8GroupedLinear):
                new = DeepseekV4GroupedLinear(child.in_features, child.out_features, child.n_groups)
                new.weight.data = child.dequantized_weight(dtype)
            elif isinstance(child, DeepseekV4QuantizedExperts):
                new = DeepseekV4Experts(config)
                new.gate_up_proj.data, new.down_proj.data = child.dequantized(dtype)
                carry_numerics(new, child)
            else:
                continue
            setattr(owner, attr, new)
    config.dsv4_quantization = None
    return _refresh_numerics(model, config)


def resident_weight_bytes(model: nn.Module) -> dict[str, dict[str, float]]:
    """Measured storage of the quantized modules: for "fp8_linears" and "experts", the resident bytes (data +
    scales), the number of weights they stand for, and bytes per weight."""
    totals = {"fp8_linears": [0, 0], "experts": [0, 0]}
    for module in model.modules():
        if isinstance(module, (DeepseekV4Fp8Linear, DeepseekV4Fp8GroupedLinear)):
            entry, count = totals["fp8_linears"], module.weight.numel()
        elif isinstance(module, DeepseekV4QuantizedExperts):
            entry = totals["experts"]
            count = sum(w.shape.numel() for w in module.expert_banks(torch.float32))
        else:
            continue
        entry[0] += module.quantized_nbytes()
        entry[1] += count
    return {
        key: {"bytes": b, "params": n, "bytes_per_param": b / n if n else float("nan")}
        for key, (b, n) in totals.items()
    }
