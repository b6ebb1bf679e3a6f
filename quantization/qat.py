"""FP4 quantization-aware training (tech report §3.4 "FP4 Quantization-Aware Training").

DeepSeek trained the routed experts with FP32 master weights that are quantized to FP4 (E2M1, 1x32 groups, pow2
scales) in every forward, converted losslessly to FP8 for the matmul, with straight-through gradients to the
master weights. `prepare_fp4_qat` swaps the routed experts (and optionally the FP8 linears, fake-quantized to E4M3
128x128 blocks) for modules that do exactly that; parameter names do not change, so optimizers, `Trainer`
checkpoints and PEFT (`target_modules` on linears, `target_parameters` on `mlp.experts.*`) work as on the dense
model. `convert_qat` then stores the quantized weights: the quantized model's dequantized weights are bit-identical
to the fake-quantized ones, so its logits equal the QAT model's.

The fake quantization uses the same functions as the converter and the quantized modules
(`modeling_deepseek_v4.quant_formats`), so an exported checkpoint re-quantizes with no change.
"""

from __future__ import annotations

import torch
from torch import nn

from modeling_deepseek_v4.attention import DeepseekV4GroupedLinear
from modeling_deepseek_v4.moe import DeepseekV4Experts
from modeling_deepseek_v4.quantized_modules import QuantizationLayout, iter_fp8_targets
from modeling_deepseek_v4.reference_numerics import carry_numerics
from modeling_deepseek_v4.weight_formats import FP8, grouped_linear, weight_format

from .quantize import _config_of, _expert_owners, _refresh_numerics, quantize_model


def fake_quantize(w: torch.Tensor, fmt: str, halves: int = 1) -> torch.Tensor:
    """Quantize-dequantize `w [..., N, K]` with the official rules of format `fmt` (`weight_formats.FORMATS`:
    "fp4" E2M1 1x32 groups, "fp8" E4M3 128x128 blocks, "fp8_block32"; `halves` row halves blocked separately).
    Values are computed in fp32 and returned in w.dtype."""
    return weight_format(fmt).fake_quantize(w.detach().float(), halves).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized weight, exactly. Backward: the gradient passes to the master weight unchanged."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, fmt: str, halves: int) -> torch.Tensor:
        return fake_quantize(w, fmt, halves)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def ste_quantize(w: torch.Tensor, fmt: str, halves: int = 1) -> torch.Tensor:
    return _StraightThrough.apply(w, fmt, halves)


class FakeQuantWeight:
    """Expert bank `[E, N, K]` seen by `grouped_experts`: indexing fake-quantizes only the selected experts (the
    quantization is per expert, so this equals fake-quantizing the whole bank), in the activation dtype."""

    def __init__(self, weight: torch.Tensor, fmt: str, dtype: torch.dtype, halves: int = 1):
        self.weight, self.fmt, self.dtype, self.halves = weight, fmt, dtype, halves
        self.shape = weight.shape

    def __getitem__(self, index) -> torch.Tensor:
        return ste_quantize(self.weight[index], self.fmt, self.halves).to(self.dtype)


class DeepseekV4QATExperts(DeepseekV4Experts):
    """Routed experts with fp32 master weights (`gate_up_proj`, `down_proj` Parameters, names unchanged) that are
    fake-quantized (`fmt` "fp4" or "fp8") with straight-through gradients in every forward."""

    def __init__(self, config, fmt: str = "fp4"):
        super().__init__(config)
        self.fmt = fmt

    def expert_banks(self, dtype: torch.dtype) -> tuple[FakeQuantWeight, FakeQuantWeight]:
        # `self.gate_up_proj` is read here, at call time: a PEFT parametrization (LoRA on the experts) is fake-
        # quantized together with the master weight, i.e. training sees the merged weight's quantization.
        return (
            FakeQuantWeight(self.gate_up_proj, self.fmt, dtype, halves=2),
            FakeQuantWeight(self.down_proj, self.fmt, dtype),
        )


class DeepseekV4Fp8QATLinear(nn.Linear):
    """`nn.Linear` whose fp32 master weight is fake-quantized to E4M3 128x128 blocks in every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, ste_quantize(self.weight, FP8.key).to(x.dtype))


class DeepseekV4Fp8QATGroupedLinear(DeepseekV4GroupedLinear):
    """Grouped `o_a_proj` with an E4M3 fake-quantized weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grouped_linear(x, ste_quantize(self.weight, FP8.key).to(x.dtype), self.n_groups)


def _move(new: nn.Module, old: nn.Module, names: tuple[str, ...], dtype: torch.dtype | None = None) -> nn.Module:
    """Give `new` (built on the meta device: no memory) `old`'s parameters as `dtype` copies (same names,
    requires_grad kept; default: the tensors themselves in fp32), and `old`'s numerics switch."""
    for name in names:
        p = getattr(old, name)
        value = p.detach().float() if dtype is None else p.detach().to(dtype)
        setattr(new, name, nn.Parameter(value, requires_grad=p.requires_grad))
    return carry_numerics(new, old)


def _linear_like(old: nn.Module, linear_cls: type, grouped_cls: type) -> nn.Module:
    """An empty module of `linear_cls` / `grouped_cls` (for a grouped `o_a_proj`) with `old`'s shape, on meta."""
    with torch.device("meta"):
        if isinstance(old, DeepseekV4GroupedLinear):
            return grouped_cls(old.in_features, old.out_features, old.n_groups)
        return linear_cls(old.in_features, old.out_features, bias=False)


def prepare_fp4_qat(model: nn.Module, experts: str = "fp4", linears: bool = False) -> nn.Module:
    """Turn a dense DeepSeek-V4 model into its QAT form in place and return it.

    experts: "fp4" (official QAT) or "fp8" fake quantization of the routed experts. linears: also fake-quantize
    the FP8 linears (attention projections incl. `o_a_proj`, indexer `q_b_proj`, shared experts, MTP projections)
    to E4M3. Master weights become fp32 Parameters with the same names. Call before wrapping with PEFT.
    """
    config = _config_of(model)
    if QuantizationLayout.from_config(config) is not None:
        raise ValueError(
            "prepare_fp4_qat needs dense master weights, but this model is quantized (config.dsv4_quantization); "
            "load it dense (or call dequantize_model) first"
        )
    if experts not in ("fp4", "fp8"):
        raise ValueError(f"experts={experts!r}: expected 'fp4' or 'fp8'")
    for owner in _expert_owners(model):
        old = owner.experts
        if type(old) is not DeepseekV4Experts:
            raise TypeError(f"cannot prepare {type(old).__name__} for QAT: expected dense DeepseekV4Experts")
        with torch.device("meta"):
            new = DeepseekV4QATExperts(config, experts)
        owner.experts = _move(new, old, ("gate_up_proj", "down_proj"))
    if linears:
        for _, owner, attr in list(iter_fp8_targets(model)):
            old = getattr(owner, attr)
            if type(old) not in (nn.Linear, DeepseekV4GroupedLinear):
                raise TypeError(f"cannot prepare {type(old).__name__} at {attr} for QAT: expected a dense linear")
            new = _linear_like(old, DeepseekV4Fp8QATLinear, DeepseekV4Fp8QATGroupedLinear)
            setattr(owner, attr, _move(new, old, ("weight",)))
    config.dsv4_qat = {"experts": experts, "linears": bool(linears)}
    return _refresh_numerics(model, config)


@torch.no_grad()
def convert_qat(model: nn.Module, scale_dtype: str = "float8_e8m0fnu") -> nn.Module:
    """Replace the QAT modules by quantized modules holding the same fake-quantized values (in place; returns the
    model). Merge PEFT adapters first (`merge_and_unload()`), so that what is stored is what training saw."""
    config = _config_of(model)
    qat = getattr(config, "dsv4_qat", None)
    if not qat or qat.get("converted"):
        raise ValueError("convert_qat: this model was not prepared with prepare_fp4_qat (or is already converted)")
    leftovers = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    if leftovers:
        raise ValueError(
            f"convert_qat: the model still has adapter layers ({leftovers[0]}, ...); merge them first with "
            "`model = peft_model.merge_and_unload()` so the stored weights include the adapters"
        )
    for owner in _expert_owners(model):
        old = owner.experts
        with torch.device("meta"):
            dense = DeepseekV4Experts(config)
        owner.experts = _move(dense, old, ("gate_up_proj", "down_proj"))
    for _, owner, attr in list(iter_fp8_targets(model)):
        old = getattr(owner, attr)
        if isinstance(old, (DeepseekV4Fp8QATLinear, DeepseekV4Fp8QATGroupedLinear)):
            setattr(owner, attr, _move(_linear_like(old, nn.Linear, DeepseekV4GroupedLinear), old, ("weight",)))
    # kept as provenance (model cards): the stored weights are the QAT-trained ones
    config.dsv4_qat = {**qat, "converted": True}
    weights = "fp8" if qat["linears"] else None
    return quantize_model(model, weights=weights, experts=qat["experts"], scale_dtype=scale_dtype)
