"""Weights kept quantized in memory: FP8 linears (128x128 blocks) and FP4 / FP8 routed-expert banks.

The official checkpoints store FP8 E4M3 weights with one E8M0 scale per 128x128 block and routed experts as packed
FP4 E2M1 with one scale per 1x32 group (official-format.md §6-8; official `inference/model.py`, `Linear`). These
modules keep exactly those bytes as buffers (names as the native port: `<module>.weight` +
`<module>.weight_scale_inv`, `mlp.experts.gate_up_proj` + `gate_up_proj_scale_inv`, ...) and dequantize at call
time: a whole FP8 linear per call, only the routed experts that receive tokens for the expert banks. The matmul is
the `quantized_linear` / `grouped_experts` op, so a fused kernel can replace the reference without touching this
file. Dequantization is exact (<= 4 significant bits times a power of two), so a quantized model computes what the
same model with its weights dequantized computes, up to summation order.

`config.dsv4_quantization` (a `QuantizationLayout` dict) tells `DeepseekV4ExtModel.__init__` which modules to build
quantized, so `from_pretrained` of a converted `--dtype keep` folder, or of a saved quantized model, needs nothing
else. Quantized buffers ignore dtype casts (`model.to(torch.bfloat16)`, `.half()`): only device moves apply.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .moe import DeepseekV4Experts
from .ops import quantized_linear
from .quant_formats import FP4_GROUP, FP8_BLOCK, dequantize_weight, quantize_fp4, quantize_fp8_blocks

# Modules the official checkpoints store in FP8, by owner class (official-format.md §6.2-6.3; DSpark `main_proj`:
# dspark.md §2.3). `o_a_proj` is FP8 in the checkpoint but the reference runs it with a bf16 weight and no
# activation quantization.
FP8_MODULES = {
    "DeepseekV4Attention": ("q_a_proj", "q_b_proj", "kv_proj", "o_a_proj", "o_b_proj"),
    "DeepseekV4Indexer": ("q_b_proj",),
    "DeepseekV4MLP": ("gate_proj", "up_proj", "down_proj"),
    "DeepseekV4MTPLayer": ("e_proj", "h_proj"),
    "DeepseekV4DSparkDrafter": ("main_proj",),
}
WEIGHT_FORMATS = (None, "fp8")
EXPERT_FORMATS = (None, "fp4", "fp8")
SCALE_DTYPES = {"float8_e8m0fnu": torch.float8_e8m0fnu, "float32": torch.float32}


@dataclass(frozen=True)
class QuantizationLayout:
    """Which weights are stored quantized: `weights` (the FP8 linears) "fp8" or None, `experts` "fp4", "fp8" or
    None, and the scale dtype ("float8_e8m0fnu" like the official instruct checkpoints, or "float32")."""

    weights: str | None = "fp8"
    experts: str | None = "fp4"
    scale_dtype: str = "float8_e8m0fnu"

    def __post_init__(self):
        for name, value, allowed in (
            ("weights", self.weights, WEIGHT_FORMATS),
            ("experts", self.experts, EXPERT_FORMATS),
            ("scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES)),
        ):
            if value not in allowed:
                raise ValueError(f"dsv4_quantization.{name}={value!r} is not supported; expected one of {allowed}")

    @classmethod
    def from_config(cls, config) -> QuantizationLayout | None:
        """The layout in `config.dsv4_quantization`, or None for a dense model. Also reads the official
        `quantization_config` dict (`{"quant_method": "fp8", "scale_fmt": ...}`) with `config.expert_dtype`."""
        spec = getattr(config, "dsv4_quantization", None)
        if not spec:
            return None
        if "quant_method" in spec:
            scale = "float8_e8m0fnu" if spec.get("scale_fmt") == "ue8m0" else "float32"
            return cls("fp8", getattr(config, "expert_dtype", None) or "fp8", scale)
        unknown = set(spec) - {"weights", "experts", "scale_dtype"}
        if unknown:
            raise ValueError(
                f"dsv4_quantization has unknown keys {sorted(unknown)}; expected weights, experts, scale_dtype"
            )
        return cls(**spec)

    def to_dict(self) -> dict:
        return {"weights": self.weights, "experts": self.experts, "scale_dtype": self.scale_dtype}

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]


class QuantizedWeight:
    """A quantized weight stack `[..., N, K]` as the ops see it: `shape` is the dense shape and indexing the leading
    dims dequantizes only the selection (one expert, or the experts gathered for a few tokens).

    `halves=2` marks a fused gate/up bank whose two row halves were blocked separately (the official w1 and w3 are
    separate FP8 tensors, so with FP8 experts and I % 128 != 0 the block grid does not run across the seam).
    """

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, halves: int = 1):
        self.data, self.scale, self.dtype, self.halves = data, scale, dtype, halves
        packed = data.dtype in (torch.int8, torch.uint8)
        self.shape = torch.Size((*data.shape[:-1], data.shape[-1] * (2 if packed else 1)))

    def _dequantize(self, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.halves == 1 or data.dtype != torch.float8_e4m3fn:
            return dequantize_weight(data, scale, self.dtype)
        parts = zip(data.chunk(self.halves, dim=-2), scale.chunk(self.halves, dim=-2))
        return torch.cat([dequantize_weight(d, s, self.dtype) for d, s in parts], dim=-2)

    def __getitem__(self, index) -> torch.Tensor:
        return self._dequantize(self.data[index], self.scale[index])

    def dequantize(self) -> torch.Tensor:
        return self._dequantize(self.data, self.scale)


class _KeepsStorageDtype:
    """Mixin: dtype casts of the module tree skip the quantized buffers (device moves still apply)."""

    _quantized_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        # `nn.Module.to(dtype)` converts every floating-point tensor, which includes float8: hide them as bytes.
        dtypes = {name: self._buffers[name].dtype for name in self._quantized_buffers if name in self._buffers}
        flags = {name: getattr(self._buffers[name], "_is_hf_initialized", False) for name in dtypes}
        for name in dtypes:
            self._buffers[name] = self._buffers[name].view(torch.uint8)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, dtype in dtypes.items():
                self._buffers[name] = self._buffers[name].view(dtype)
                if flags[name]:
                    # transformers marks loaded tensors; keep the mark so `_init_weights` never overwrites them
                    self._buffers[name]._is_hf_initialized = True

    def quantized_nbytes(self) -> int:
        return sum(self._buffers[name].nbytes for name in self._quantized_buffers)


def _fp8_scale_shape(rows: int, cols: int, halves: int = 1) -> tuple[int, int]:
    per_half = rows // halves
    return halves * -(-per_half // FP8_BLOCK[0]), -(-cols // FP8_BLOCK[1])


def _quantize_fp8(w: torch.Tensor, scale_dtype: torch.dtype, halves: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`[..., N, K]` -> E4M3 + block scales, each row half (fused gate/up) blocked on its own like the official."""
    parts = [quantize_fp8_blocks(h, scale_dtype=scale_dtype) for h in w.chunk(halves, dim=-2)]
    return torch.cat([p[0] for p in parts], dim=-2), torch.cat([p[1] for p in parts], dim=-2)


class DeepseekV4Fp8Linear(_KeepsStorageDtype, nn.Linear):
    """`nn.Linear` whose weight is E4M3 `[out, in]` with scales `weight_scale_inv [ceil(out/128), ceil(in/128)]`.

    Stays an `nn.Linear` subclass so PEFT LoRA wraps it like any linear (the base output comes from this forward);
    the weight is a buffer, so optimizers never see it.
    """

    _quantized_buffers = ("weight", "weight_scale_inv")

    def __init__(self, in_features: int, out_features: int, scale_dtype: torch.dtype = torch.float8_e8m0fnu):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer(
            "weight_scale_inv", torch.empty(_fp8_scale_shape(out_features, in_features), dtype=scale_dtype)
        )
        self.register_parameter("bias", None)
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.weight_scale_inv, backend=self.backend)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale_inv, dtype)

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor) -> None:
        """Quantize a dense `[out, in]` weight into this module (official 128x128 pow2 block rule)."""
        q, s = _quantize_fp8(weight.detach(), self.weight_scale_inv.dtype)
        self.weight, self.weight_scale_inv = q.to(self.weight.device), s.to(self.weight.device)

    def reset_parameters(self) -> None:
        # transformers initializes through `_init_weights`; nn.Linear's own init cannot write float8.
        pass

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 128x128 blocks"


class DeepseekV4Fp8GroupedLinear(_KeepsStorageDtype, nn.Module):
    """Grouped `o_a_proj` with an E4M3 weight `[g * d_g, H * D / g]`; computes like the reference's `wo_a`
    (the weight dequantized to the activation dtype, no activation quantization)."""

    _quantized_buffers = ("weight", "weight_scale_inv")

    def __init__(self, in_features_per_group: int, out_features: int, n_groups: int, scale_dtype=torch.float8_e8m0fnu):
        super().__init__()
        self.in_features, self.out_features, self.n_groups = in_features_per_group, out_features, n_groups
        self.register_buffer("weight", torch.empty(out_features, in_features_per_group, dtype=torch.float8_e4m3fn))
        shape = _fp8_scale_shape(out_features, in_features_per_group)
        self.register_buffer("weight_scale_inv", torch.empty(shape, dtype=scale_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., g, H * D / g]` -> `[..., g * d_g]`."""
        w = dequantize_weight(self.weight, self.weight_scale_inv, x.dtype).view(self.n_groups, -1, self.in_features)
        return torch.einsum("...gi,goi->...go", x, w).flatten(-2)

    dequantized_weight = DeepseekV4Fp8Linear.dequantized_weight
    load_dense = DeepseekV4Fp8Linear.load_dense

    def extra_repr(self) -> str:
        return f"groups={self.n_groups}, in_per_group={self.in_features}, out={self.out_features}, fp8 e4m3"


class DeepseekV4QuantizedExperts(_KeepsStorageDtype, nn.Module):
    """Routed experts kept as FP4 (packed E2M1, 1x32 groups) or FP8 (E4M3, 128x128 blocks per expert) buffers:
    `gate_up_proj [E, 2I, d/2]` int8 (fp4) or `[E, 2I, d]` e4m3 (fp8) plus `gate_up_proj_scale_inv`, same for
    `down_proj [E, d, I(/2)]`. Only experts that receive tokens are dequantized, one at a time."""

    _quantized_buffers = ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")

    def __init__(self, config, fmt: str, scale_dtype: torch.dtype = torch.float8_e8m0fnu):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.limit = config.swiglu_limit
        self.backend = config.ops_backend
        self.fmt = fmt
        self.act_quant = False
        e, inter, d = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        for name, rows, cols, halves in (("gate_up_proj", 2 * inter, d, 2), ("down_proj", d, inter, 1)):
            if fmt == "fp4":
                if cols % 2:
                    raise ValueError(f"FP4 experts need an even input width; {name} has {cols}")
                data = torch.empty(e, rows, cols // 2, dtype=torch.int8)
                scale = torch.empty(e, rows, -(-cols // FP4_GROUP), dtype=scale_dtype)
            else:
                data = torch.empty(e, rows, cols, dtype=torch.float8_e4m3fn)
                scale = torch.empty(e, *_fp8_scale_shape(rows, cols, halves), dtype=scale_dtype)
            self.register_buffer(name, data)
            self.register_buffer(name + "_scale_inv", scale)

    def expert_banks(self, dtype: torch.dtype) -> tuple[QuantizedWeight, QuantizedWeight]:
        """Lazy dequantizing views (`QuantizedWeight`) of `gate_up_proj` and `down_proj` in `dtype`."""
        return (
            QuantizedWeight(self.gate_up_proj, self.gate_up_proj_scale_inv, dtype, halves=2),
            QuantizedWeight(self.down_proj, self.down_proj_scale_inv, dtype),
        )

    compute_dtype = None
    forward = DeepseekV4Experts.forward

    @torch.no_grad()
    def load_dense(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        """Quantize dense `[E, 2I, d]` / `[E, d, I]` banks into this module (official rules, one expert at a time)."""
        for name, w, halves in (("gate_up_proj", gate_up_proj, 2), ("down_proj", down_proj, 1)):
            data, scale = getattr(self, name), getattr(self, name + "_scale_inv")
            for e in range(w.shape[0]):
                if self.fmt == "fp4":
                    q, s = quantize_fp4(w[e].detach().float(), scale_dtype=scale.dtype)
                else:
                    q, s = _quantize_fp8(w[e].detach().float(), scale.dtype, halves)
                data[e].copy_(q.view(data.dtype))
                scale[e].copy_(s)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = self.expert_banks(dtype)
        return gate_up.dequantize(), down.dequantize()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, {self.fmt} ({'1x32 groups' if self.fmt == 'fp4' else '128x128'})"


def iter_fp8_targets(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(qualified name, owner module, attribute) of every module the official checkpoints store in FP8."""
    for name, owner in model.named_modules():
        for attr in FP8_MODULES.get(type(owner).__name__, ()):
            if isinstance(getattr(owner, attr, None), nn.Module):
                yield f"{name}.{attr}" if name else attr, owner, attr


def empty_fp8_like(old: nn.Module, scale_dtype: torch.dtype, backend: str = "auto") -> nn.Module:
    """An empty FP8 module with the shape of the linear `old` (grouped `o_a_proj` or `nn.Linear`)."""
    if hasattr(old, "n_groups"):
        return DeepseekV4Fp8GroupedLinear(old.in_features, old.out_features, old.n_groups, scale_dtype)
    new = DeepseekV4Fp8Linear(old.in_features, old.out_features, scale_dtype)
    new.backend = backend
    return new


def build_quantized_modules(model: nn.Module, config) -> None:
    """Swap in empty quantized modules for `config.dsv4_quantization` (called by `DeepseekV4ExtModel.__init__`)."""
    layout = QuantizationLayout.from_config(config)
    if layout is None:
        return
    scale_dtype = layout.torch_scale_dtype
    if layout.weights == "fp8":
        for _, owner, attr in list(iter_fp8_targets(model)):
            setattr(owner, attr, empty_fp8_like(getattr(owner, attr), scale_dtype, config.ops_backend))
    if layout.experts is not None:
        for owner in [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]:
            owner.experts = DeepseekV4QuantizedExperts(config, layout.experts, scale_dtype)


def init_quantized_module(module: nn.Module, std: float) -> bool:
    """Random init (quantized normal(0, std)) for `_init_weights`; skips buffers that were loaded or live on meta.
    Returns whether `module` is a quantized module."""
    buffers = [module._buffers.get(n) for n in getattr(module, "_quantized_buffers", ())]
    buffers = [b for b in buffers if b is not None]
    # Meta buffers (accelerate's `init_empty_weights(include_buffers=True)`) hold no values: a random init would
    # quantize full-size dense weights on the CPU only to drop them.
    loaded = any(getattr(b, "_is_hf_initialized", False) or b.is_meta for b in buffers)
    if isinstance(module, DeepseekV4QuantizedExperts):
        if not loaded:
            e, rows = module.num_experts, module.gate_up_proj.shape[1]
            d, inter = module.down_proj.shape[1], rows // 2
            gen = torch.Generator().manual_seed(0)
            module.load_dense(
                torch.randn(e, rows, d, generator=gen) * std, torch.randn(e, d, inter, generator=gen) * std
            )
        return True
    if isinstance(module, (DeepseekV4Fp8Linear, DeepseekV4Fp8GroupedLinear)):
        if not loaded:
            module.load_dense(torch.randn(module.weight.shape) * std)
        return True
    return False


__all__ = [
    "DeepseekV4Fp8GroupedLinear",
    "DeepseekV4Fp8Linear",
    "DeepseekV4QuantizedExperts",
    "QuantizationLayout",
    "QuantizedWeight",
    "build_quantized_modules",
    "iter_fp8_targets",
]
