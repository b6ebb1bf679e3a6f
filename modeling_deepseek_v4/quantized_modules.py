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
from .parallel_plans import local_tensor, rewrap_like
from .weight_formats import FORMATS, FP8, PackedWeight, WeightFormat, grouped_linear, is_official_fp8_linear

WEIGHT_FORMATS = (None, *(key for key, f in FORMATS.items() if f.per_element == 1))
EXPERT_FORMATS = (None, *FORMATS)
SCALE_DTYPES = {"float8_e8m0fnu": torch.float8_e8m0fnu, "float32": torch.float32}


@dataclass(frozen=True)
class QuantizationLayout:
    """Which weights are stored quantized: `weights` (the official FP8 linears) "fp8" / "fp8_block32" or None,
    `experts` "fp4", "fp8", "fp8_block32" or None (`weight_formats.FORMATS`), and the scale dtype
    ("float8_e8m0fnu" like the official instruct checkpoints, or "float32")."""

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


# The value the ops receive for a quantized expert bank (kept under its former name for callers).
QuantizedWeight = PackedWeight


class _KeepsStorageDtype:
    """Mixin: dtype casts of the module tree skip the quantized buffers (device moves still apply). Under tensor /
    expert parallelism the buffers are DTensors holding this rank's slice (quantized_parallel.py); `stored` gives the
    local tensor the forwards compute with."""

    _quantized_buffers: tuple[str, ...] = ()
    _buffer_layout: str | None = None  # "linear" `[out, in]` or "experts" `[E, rows, cols]`: quantized_parallel.py

    def stored(self, name: str) -> torch.Tensor:
        """The buffer `name`, as this rank's local slice when it is sharded."""
        return local_tensor(self._buffers[name])

    def __setattr__(self, name, value):
        # transformers' loader sets a sharded (DTensor) tensor as an `nn.Parameter`; a quantized buffer stays a buffer
        if isinstance(value, nn.Parameter) and name in self._quantized_buffers and name in self._buffers:
            flag = getattr(value, "_is_hf_initialized", False)
            value = value.detach()
            value._is_hf_initialized = flag
            self._buffers[name] = value
            return
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        # `nn.Module.to(dtype)` converts every floating-point tensor, which includes float8: hide them as bytes.
        hidden = {}
        for name in self._quantized_buffers:
            buf = self._buffers.get(name)
            if buf is not None:
                hidden[name] = (buf, getattr(buf, "_is_hf_initialized", False))
                self._buffers[name] = local_tensor(buf).view(torch.uint8)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, (buf, flag) in hidden.items():
                value = rewrap_like(self._buffers[name].view(buf.dtype), buf)
                if flag:
                    # transformers marks loaded tensors; keep the mark so `_init_weights` never overwrites them
                    value._is_hf_initialized = True
                self._buffers[name] = value

    def quantized_nbytes(self) -> int:
        return sum(self._buffers[name].nbytes for name in self._quantized_buffers)


class _Fp8Storage(_KeepsStorageDtype):
    """Mixin: an E4M3 weight `[out, in]` with block scales `weight_scale_inv [ceil(out/b), ceil(in/b)]` for the block
    `b` of its format (128 in the V4 releases; `weight_formats.FP8_BLOCK32` for 32x32 blocks)."""

    _quantized_buffers = ("weight", "weight_scale_inv")
    _buffer_layout = "linear"

    def _init_storage(self, in_features: int, out_features: int, scale_dtype, fmt: WeightFormat) -> None:
        self.in_features, self.out_features, self.format = in_features, out_features, fmt
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=fmt.storage_dtype))
        shape = fmt.scale_shape((out_features, in_features))
        self.register_buffer("weight_scale_inv", torch.empty(shape, dtype=scale_dtype or torch.float8_e8m0fnu))

    def packed(self, dtype: torch.dtype) -> PackedWeight:
        return PackedWeight(self.stored("weight"), self.stored("weight_scale_inv"), self.format, dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed(dtype).dequantize()

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor) -> None:
        """Quantize a dense weight into this module (official power-of-two block rule). In place where the shapes
        match, so a sharded buffer (tensor parallelism: `weight` is this rank's slice) keeps its wrapper."""
        q, s = self.format.quantize(weight.detach(), self.weight_scale_inv.dtype)
        data, scale = self.stored("weight"), self.stored("weight_scale_inv")
        if data.shape == q.shape and scale.shape == s.shape and data.device.type != "meta":
            data.copy_(q)
            scale.copy_(s)
        else:
            self.weight, self.weight_scale_inv = q.to(self.weight.device), s.to(self.weight.device)


class DeepseekV4Fp8Linear(_Fp8Storage, nn.Linear):
    """`nn.Linear` whose weight is stored in FP8 (`_Fp8Storage`). Stays an `nn.Linear` subclass so PEFT LoRA wraps
    it like any linear (the base output comes from this forward); the weight is a buffer, so optimizers never see
    it."""

    def __init__(self, in_features: int, out_features: int, scale_dtype=None, fmt: WeightFormat = FP8):
        nn.Module.__init__(self)
        self._init_storage(in_features, out_features, scale_dtype, fmt)
        self.register_parameter("bias", None)
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.packed(x.dtype), backend=self.backend)

    def reset_parameters(self) -> None:
        # transformers initializes through `_init_weights`; nn.Linear's own init cannot write float8.
        pass

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.format.describe()}"


class DeepseekV4Fp8GroupedLinear(_Fp8Storage, nn.Module):
    """Grouped `o_a_proj` with an E4M3 weight `[g * d_g, H * D / g]`; computes like the reference's `wo_a`
    (the weight dequantized to the activation dtype, no activation quantization: `weight_formats.grouped_linear`).
    Not an `nn.Linear`: PEFT must not treat the grouped projection as a dense one."""

    def __init__(self, in_features_per_group: int, out_features: int, n_groups: int, scale_dtype=None, fmt=FP8):
        super().__init__()
        self._init_storage(in_features_per_group, out_features, scale_dtype, fmt)
        self.n_groups = n_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., g, H * D / g]` -> `[..., g * d_g]`."""
        return grouped_linear(x, self.dequantized_weight(x.dtype), self.n_groups)

    def extra_repr(self) -> str:
        shape = f"groups={self.n_groups}, in_per_group={self.in_features}, out={self.out_features}"
        return f"{shape}, {self.format.describe()}"


class DeepseekV4QuantizedExperts(_KeepsStorageDtype, nn.Module):
    """Routed experts kept in a `WeightFormat` (packed FP4 E2M1 in 1x32 groups, or E4M3 in blocks per expert):
    `gate_up_proj [E, 2I, d/2]` int8 (fp4) or `[E, 2I, d]` e4m3 (fp8) plus `gate_up_proj_scale_inv`, same for
    `down_proj [E, d, I(/2)]`. Only experts that receive tokens are dequantized, one at a time."""

    _quantized_buffers = ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")
    _buffer_layout = "experts"
    # gate/up: the official w1 and w3 are separate tensors, each blocked on its own
    _HALVES = {"gate_up_proj": 2, "down_proj": 1}

    def __init__(self, config, fmt: WeightFormat | str, scale_dtype: torch.dtype = torch.float8_e8m0fnu):
        super().__init__()
        self.format = FORMATS[fmt] if isinstance(fmt, str) else fmt
        self.num_experts = config.n_routed_experts
        self.limit = config.swiglu_limit
        self.backend = config.ops_backend
        self.reference_numerics = False  # R1 inside the expert loop (reference_numerics.py)
        e, inter, d = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        for name, rows, cols in (("gate_up_proj", 2 * inter, d), ("down_proj", d, inter)):
            data = torch.empty(self.format.storage_shape((e, rows, cols)), dtype=self.format.storage_dtype)
            scale = torch.empty(self.format.scale_shape((e, rows, cols), self._HALVES[name]), dtype=scale_dtype)
            self.register_buffer(name, data)
            self.register_buffer(name + "_scale_inv", scale)

    @property
    def fmt(self) -> str:
        return self.format.key

    @property
    def qweight(self) -> torch.Tensor:
        """The stored gate/up bank: PEFT reads `qweight` for the device of a quantized layer it wraps (these
        modules have buffers, no parameters)."""
        return self.stored("gate_up_proj")

    def expert_banks(self, dtype: torch.dtype) -> tuple[PackedWeight, PackedWeight]:
        """`PackedWeight` values of `gate_up_proj` and `down_proj`, dequantizing in `dtype` what is indexed."""
        return tuple(
            PackedWeight(self.stored(n), self.stored(n + "_scale_inv"), self.format, dtype, self._HALVES[n])
            for n in ("gate_up_proj", "down_proj")
        )

    compute_dtype = None
    forward = DeepseekV4Experts.forward

    @torch.no_grad()
    def load_dense(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        """Quantize dense `[E, 2I, d]` / `[E, d, I]` banks into this module (official rules, one expert at a time)."""
        for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            data, scale = self.stored(name), self.stored(name + "_scale_inv")  # in place, this rank's slice
            for e in range(w.shape[0]):
                q, s = self.format.quantize(w[e].detach().float(), scale.dtype, self._HALVES[name])
                data[e].copy_(q.view(data.dtype))
                scale[e].copy_(s)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = self.expert_banks(dtype)
        return gate_up.dequantize(), down.dequantize()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, {self.format.describe()}"


def iter_fp8_targets(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(qualified name, owner module, attribute) of every linear the official checkpoints store in FP8
    (`weight_formats.OFFICIAL_FP8_LINEARS`)."""
    for name, _ in list(model.named_modules()):
        if is_official_fp8_linear(name):
            parent, _, attr = name.rpartition(".")
            yield name, model.get_submodule(parent), attr


def empty_fp8_like(old: nn.Module, scale_dtype: torch.dtype, backend: str = "auto", fmt: WeightFormat = FP8):
    """An empty FP8 module with the shape of the linear `old` (grouped `o_a_proj` or `nn.Linear`)."""
    if hasattr(old, "n_groups"):
        return DeepseekV4Fp8GroupedLinear(old.in_features, old.out_features, old.n_groups, scale_dtype, fmt)
    new = DeepseekV4Fp8Linear(old.in_features, old.out_features, scale_dtype, fmt)
    new.backend = backend
    return new


def build_quantized_modules(model: nn.Module, config) -> None:
    """Swap in empty quantized modules for `config.dsv4_quantization` (called by `DeepseekV4ExtModel.__init__`)."""
    layout = QuantizationLayout.from_config(config)
    if layout is None:
        return
    scale_dtype = layout.torch_scale_dtype
    if layout.weights is not None:
        fmt = FORMATS[layout.weights]
        for _, owner, attr in list(iter_fp8_targets(model)):
            setattr(owner, attr, empty_fp8_like(getattr(owner, attr), scale_dtype, config.ops_backend, fmt))
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
