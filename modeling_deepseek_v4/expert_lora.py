"""Grouped LoRA for the routed experts and the grouped output projection `o_a_proj`, as PEFT custom LoRA layers
(issue #14; PEFT's custom-model mechanism `LoraConfig._register_custom_module`; docs/hf-integration.md §8).

PEFT's `target_parameters` LoRA on a 3-D expert bank adds a full `[E, out, in]` delta to the weight on every forward
and cannot reach quantized banks. Here each expert e computes `W_e x + s * B_e (A_e x)` for the rows routed to it,
inside the experts op's own loop (`ops_reference.grouped_experts`, `lora_*` arguments): no delta is ever formed, the
base bank stays in its storage (dense, FP8, packed FP4, bitsandbytes NF4 / FP4, QAT) and is read as the forward
reads it. Factors, per adapter:
- experts: `lora_A.<adapter>.gate_up_proj [E, r, d]`, `lora_A.<adapter>.down_proj [E, r_down, I]`,
  `lora_B.<adapter>.gate_up_proj [E, 2I, r]`, `lora_B.<adapter>.down_proj [E, d, r_down]`;
- `o_a_proj`: `lora_A.<adapter>.weight [g, r, H * D / g]`, `lora_B.<adapter>.weight [g, d_g, r]` (one pair per group,
  so groups never mix).
Ranks: `LoraConfig.r`, or per projection with `rank_pattern={"experts.down_proj": 8}` (a key no module name
matches, so PEFT itself ignores it; it is saved with the adapter). `rank_pattern={"experts.shared": 1}` shares one
A / B pair across all experts (factors `[1, ...]`).
Expert parallelism (`DistributedConfig(ep_size=...)`): each rank holds the factors of its own experts `[E_local, ...]`;
shared factors are replicated and their gradients summed over the EP group. TP-split experts are refused. Tensor
parallelism splits `o_a_proj` by head groups: each rank holds its groups' factors `[g_local, ...]`. Saved adapters
hold every expert's and group's factors either way (expert_lora_parallel.py).

Merging: dense banks add `s * B_e A_e` in place (exact inverse on unmerge up to rounding). Quantized banks are
dequantized, merged and re-quantized with the format's official rules; `merge_report` says how many blocks changed
and unmerge restores the saved quantized bytes exactly. `densify_lora_bases(model, dtype)` first turns quantized
bases into dense ones, to merge in bf16 instead.
"""

from __future__ import annotations

import logging
import math
import warnings
from types import SimpleNamespace

import torch
from torch import nn

from .attention import DeepseekV4GroupedLinear
from .bnb_quant import DeepseekV4Bnb4bitExperts, DeepseekV4Bnb4bitGroupedLinear
from .compat import quiet_bitsandbytes_import
from .expert_lora_parallel import gather_sharded_factors, slice_sharded_factors
from .moe import DeepseekV4Experts
from .parallel_plans import SumGradients, expert_group, local_tensor, row_shard_group
from .quantized_modules import DeepseekV4Fp8GroupedLinear, DeepseekV4QuantizedExperts
from .reference_numerics import carry_numerics

try:  # optional dependency (it imports bitsandbytes where installed: compat.quiet_bitsandbytes_import says why quiet)
    with quiet_bitsandbytes_import():
        from peft import LoraConfig, PeftModel
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import check_adapters_to_merge
except ImportError:
    LoraConfig = PeftModel = check_adapters_to_merge = None
    LoraLayer = object

logger = logging.getLogger(__name__)
# PEFT adds its own TP hooks only to LoRA on "colwise" / "rowwise" bases and warns for any other plan. The only LoRA
# target this package's plans mark "local_params" is `o_a_proj`, whose grouped LoRA shards its factors itself.
warnings.filterwarnings("ignore", message='TP plan "local_params" on the base layer is not supported for LoRA')


def _require_peft() -> None:
    if LoraConfig is None:
        raise ImportError("Grouped expert LoRA needs PEFT: `pip install peft`.")


class LoraFactors(nn.Module):
    """One adapter's A (or B) factors: one parameter per projection, named like the base tensor."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device=None):
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, device=device)))


def _rank(config, projection: str, default: int) -> int:
    """`rank_pattern["experts.<projection>"]` (or any key ending with it), else the module's rank."""
    for key, value in (config.rank_pattern or {}).items():
        if key == projection or key.endswith("." + projection):
            return value
    return default


def shared_expert_factors(config) -> bool:
    """Whether `config` asks for one A / B pair shared by all experts: `rank_pattern={"experts.shared": 1}` (a key no
    module name matches, so PEFT ignores it; saved with the adapter). Default: a pair per expert."""
    return bool((config.rank_pattern or {}).get("experts.shared", 0))


def _check_config(config, layer: str) -> None:
    for field, bad in (("lora_dropout", config.lora_dropout), ("lora_bias", config.lora_bias)):
        if bad:
            raise ValueError(f"{layer}: `{field}` is not supported by the grouped LoRA layers; leave it unset")
    if config.use_dora:
        raise ValueError(f"{layer}: DoRA is not supported by the grouped LoRA layers; set use_dora=False")


def _stored(base: nn.Module, name: str) -> torch.Tensor:
    """This rank's local tensor `name` of a LoRA base (a quantized buffer or a parameter; a slice when the base is
    sharded by tensor / expert parallelism, quantized_parallel.py)."""
    return base.stored(name) if hasattr(base, "stored") else local_tensor(getattr(base, name))


class _GroupedLoraLayer(nn.Module, LoraLayer):
    """Shared PEFT plumbing: factors per adapter, init, merge / unmerge bookkeeping. Subclasses give the shapes
    (`_shapes`), the forward, and the delta of each base tensor (`_delta`)."""

    base_names: tuple[str, ...] = ()  # the base tensors a merge changes

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, r: int = 0, lora_alpha: int = 1, **kw):
        _require_peft()
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.projection_scaling: dict[str, dict[str, float]] = {}
        self.merge_report: dict[str, int] = {}
        self._quantized_backup: dict[str, torch.Tensor] | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module):
        return None, None  # several projections: shapes come from `_shapes`

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        _check_config(config, type(self).__name__)
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer, got {r}")
        shapes_a, shapes_b, ranks = self._shapes(config, r)
        device = next(iter(self.get_base_layer().buffers()), None)
        device = next(self.get_base_layer().parameters(), device)
        device = device.device if device is not None else None
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        scale = (lambda rank: lora_alpha / math.sqrt(rank)) if config.use_rslora else (lambda rank: lora_alpha / rank)
        self.scaling[adapter_name] = scale(r)
        self.projection_scaling[adapter_name] = {name: scale(rank) for name, rank in ranks.items()}
        self.use_rslora[adapter_name], self.use_dora[adapter_name] = config.use_rslora, False
        self.lora_bias[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Identity()
        self.lora_A[adapter_name] = LoraFactors(shapes_a, device)
        self.lora_B[adapter_name] = LoraFactors(shapes_b, device)
        self._init_factors(adapter_name, config.init_lora_weights)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        if self.factor_group() is not None and not getattr(self, "_sharded_hooks", False):
            # sharded base: saved adapters hold every expert's / group's factors, loaded ones give each rank its own
            self.register_state_dict_post_hook(gather_sharded_factors)
            self.register_load_state_dict_pre_hook(slice_sharded_factors)
            self._sharded_hooks = True

    def factor_group(self):
        """The process group the factors' dim 0 is split over (the base is sharded), or None."""
        return None

    @torch.no_grad()
    def _init_factors(self, adapter_name: str, init) -> None:
        """PEFT's rules per (expert, projection) matrix: A Kaiming-uniform (True) or N(0, 1/r) ("gaussian"), B zero;
        `init_lora_weights=False` randomizes B too (tests)."""
        for a, b in zip(self.lora_A[adapter_name].parameters(), self.lora_B[adapter_name].parameters()):
            rank, fan_in = a.shape[-2], a.shape[-1]
            if init == "gaussian":
                a.normal_(0.0, 1.0 / rank)
            elif init in (True, False):
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) of an [r, fan_in] weight
                a.uniform_(-bound, bound)
            else:
                raise ValueError(f"{type(self).__name__}: init_lora_weights={init!r} is not supported")
            if init is False:
                b.uniform_(-1.0 / math.sqrt(rank), 1.0 / math.sqrt(rank))
            else:
                b.zero_()

    def _active(self) -> list[str]:
        if self.disable_adapters or self.merged:
            return []
        return [a for a in self.active_adapters if a in self.lora_A]

    def _factors(self, adapters: list[str], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, s * B) of projection `name` over the active adapters (concatenated along the rank)."""
        a = [getattr(self.lora_A[ad], name) for ad in adapters]
        b = [getattr(self.lora_B[ad], name) * self.projection_scaling[ad][name] for ad in adapters]
        if len(adapters) == 1:
            return a[0], b[0]
        n = max(t.shape[0] for t in a)
        return torch.cat([t.expand(n, *t.shape[1:]) for t in a], -2), torch.cat(
            [t.expand(n, *t.shape[1:]) for t in b], -1
        )

    def _check_forward(self) -> None:
        if self.disable_adapters and self.merged:
            self.unmerge()

    # ----------------------------------------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            deltas = {name: self._delta(adapter, name) for name in self.base_names}
            if safe_merge and not all(torch.isfinite(d).all() for d in deltas.values()):
                raise ValueError(f"NaNs or infs in adapter {adapter!r}: not merged")
            self._add_deltas(deltas, sign=1.0)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._quantized_backup is not None:  # restore the quantized bytes saved before the first merge
            base = self.get_base_layer()
            for name, saved in self._quantized_backup.items():
                _stored(base, name).copy_(saved)
            self._quantized_backup = None
            self.merged_adapters.clear()
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            self._add_deltas({name: self._delta(adapter, name) for name in self.base_names}, sign=-1.0)

    @torch.no_grad()
    def _add_deltas(self, deltas: dict[str, torch.Tensor], sign: float) -> None:
        base = self.get_base_layer()
        stored = getattr(base, "_quantized_buffers", None)
        if not stored:
            for name, delta in deltas.items():
                weight = _stored(base, name)  # expert parallelism: this rank's experts, like its factors
                delta = delta.to(weight.dtype)
                # shared expert factors give one [1, out, in] delta for the whole [E, out, in] bank
                weight.add_(delta.expand_as(weight) if delta.shape != weight.shape else delta, alpha=sign)
            return
        before = {n: _stored(base, n).clone() for n in stored}
        if self._quantized_backup is None:  # the bytes before the first merge: what unmerge restores
            self._quantized_backup = before
        self._requantize(base, deltas)
        rows_changed = ((_stored(base, n) != before[n]).reshape(before[n].shape[0], -1).any(-1) for n in stored)
        changed = sum(int(rows.sum()) for rows in rows_changed)
        self.merge_report = {
            "quantized_rows_changed": changed,
            "quantized_rows": sum(t.shape[0] for t in before.values()),
        }
        logger.info("%s merged into quantized storage: %s", type(base).__name__, self.merge_report)


class DeepseekV4ExpertsLora(_GroupedLoraLayer):
    """Grouped LoRA on routed experts of any storage: `forward(x, indices, weights, static_shapes)` like the base."""

    base_names = ("gate_up_proj", "down_proj")

    def _shapes(self, config, r: int):
        base = self.get_base_layer()
        if getattr(base, "_is_hooked", False) and not getattr(base, "_is_expert_parallel", False):
            raise NotImplementedError(
                "Grouped expert LoRA on tensor-parallel routed experts (intermediate dim split over ranks) is not "
                "supported: load with `DistributedConfig(ep_size=...)` (whole experts per rank) or without TP."
            )
        gate_up, down = (local_tensor(t) for t in base.expert_banks(torch.float32))
        (e, two_i, d), inter = gate_up.shape, down.shape[-1]  # e: this rank's experts under expert parallelism
        if shared_expert_factors(config):
            e = 1  # one A / B pair for every expert (the experts op broadcasts a leading 1)
        ranks = {name: _rank(config, f"experts.{name}", r) for name in self.base_names}
        shapes_a = {"gate_up_proj": (e, ranks["gate_up_proj"], d), "down_proj": (e, ranks["down_proj"], inter)}
        shapes_b = {"gate_up_proj": (e, two_i, ranks["gate_up_proj"]), "down_proj": (e, d, ranks["down_proj"])}
        return shapes_a, shapes_b, ranks

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        self.shared_factors = {**getattr(self, "shared_factors", {}), adapter_name: shared_expert_factors(config)}
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)

    def factor_group(self):
        return expert_group(self.get_base_layer())  # expert parallelism: this rank's experts

    def _factors(self, adapters: list[str], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.factor_group()
        if group is None or not any(self.shared_factors.get(ad) for ad in adapters):
            return super()._factors(adapters, name)
        # Expert parallelism: shared factors are replicated, but each rank trains them on its own experts' rows only
        if len(adapters) > 1:
            raise NotImplementedError("Under expert parallelism, shared expert factors run as the only active adapter")
        return tuple(SumGradients.apply(t, group) for t in super()._factors(adapters, name))

    def forward(self, x, indices, weights, static_shapes: bool = False, lora=None):
        self._check_forward()
        base = self.get_base_layer()
        adapters = self._active()
        hooked = getattr(base, "_is_hooked", False)  # transformers' EP hook: `base.forward(x, indices, weights)`
        args = (x, indices, weights) if hooked else (x, indices, weights, static_shapes)
        if not adapters:
            return base(*args)
        (a13, b13), (a2, b2) = (self._factors(adapters, name) for name in self.base_names)
        factors = dict(lora_a13=a13, lora_b13=b13, lora_a2=a2, lora_b2=b2)
        if not hooked:
            return base(*args, lora=factors)
        # The hook calls the original forward on local expert ids: the factors (this rank's `[E_local, ...]`) reach
        # it through an attribute set for this call, so the hooked signature stays as transformers made it.
        base._lora_factors = factors
        try:
            return base(*args)
        finally:
            base._lora_factors = None

    def _delta(self, adapter: str, name: str) -> torch.Tensor:
        a, b = getattr(self.lora_A[adapter], name), getattr(self.lora_B[adapter], name)
        return torch.bmm(b, a) * self.projection_scaling[adapter][name]  # [E, out, in]

    def _requantize(self, base, deltas) -> None:
        gate_up, down = base.dequantized(torch.float32)
        if isinstance(base, DeepseekV4Bnb4bitExperts):
            base._store("gate_up_proj", gate_up + deltas["gate_up_proj"])
            base._store("down_proj", down + deltas["down_proj"])
        else:
            base.load_dense(gate_up + deltas["gate_up_proj"], down + deltas["down_proj"])


class DeepseekV4GroupedLinearLora(_GroupedLoraLayer):
    """Grouped LoRA on `o_a_proj`: group j's slice `x_j` gets `s * B_j (A_j x_j)`, added to its own `d_g` rows. Under
    tensor parallelism the base holds this rank's groups (weight rows `Shard(0)`), and so do the factors: the groups
    never mix, so each rank's factor gradients are already complete."""

    base_names = ("weight",)

    def factor_group(self):
        return row_shard_group(getattr(self.get_base_layer(), "weight", None))

    def _shapes(self, config, r: int):
        base = self.get_base_layer()
        g, d_g = base.n_groups, base.out_features // base.n_groups
        if self.factor_group() is not None:  # tensor parallelism: this rank's groups, its rows of the weight
            g = local_tensor(base.weight).shape[0] // d_g
        shapes_a = {"weight": (g, r, base.in_features)}
        shapes_b = {"weight": (g, d_g, r)}
        return shapes_a, shapes_b, {"weight": r}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., g, H * D / g]` -> `[..., g * d_g]`."""
        self._check_forward()
        out = self.get_base_layer()(x)
        adapters = self._active()
        if not adapters:
            return out
        a, b = self._factors(adapters, "weight")
        low = torch.einsum("...gi,gri->...gr", x.to(a.dtype), a)
        return out + torch.einsum("...gr,gor->...go", low, b).flatten(-2).to(out.dtype)

    def _delta(self, adapter: str, name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (torch.bmm(b, a) * self.projection_scaling[adapter]["weight"]).flatten(0, 1)  # [g * d_g, in]

    def _requantize(self, base, deltas) -> None:
        dense = base.dequantized_weight(torch.float32) + deltas["weight"]
        if isinstance(base, DeepseekV4Bnb4bitGroupedLinear):
            base._store("weight", dense.unsqueeze(0))
        else:
            base.load_dense(dense)


# base module type -> its grouped LoRA layer (QAT experts subclass DeepseekV4Experts)
LORA_LAYERS = {
    DeepseekV4Experts: DeepseekV4ExpertsLora,
    DeepseekV4QuantizedExperts: DeepseekV4ExpertsLora,
    DeepseekV4Bnb4bitExperts: DeepseekV4ExpertsLora,
    DeepseekV4GroupedLinear: DeepseekV4GroupedLinearLora,
    DeepseekV4Fp8GroupedLinear: DeepseekV4GroupedLinearLora,
    DeepseekV4Bnb4bitGroupedLinear: DeepseekV4GroupedLinearLora,
}


def register_lora_layers(config):
    """Register the grouped LoRA layers on a PEFT `LoraConfig` (in place); returns it."""
    _require_peft()
    config._register_custom_module(LORA_LAYERS)
    return config


# Every module a LoRA can train from the language-model loss: the attention and compressor projections, the grouped
# o_a_proj, the shared and routed experts. Not the lightning indexer (its top-k has no gradient; it learns only from
# `indexer_loss_weight`) nor the MTP block (only from `mtp_loss_weight`): `all_linear_targets` adds them on request.
_TRAINABLE = r"(q_a_proj|q_b_proj|kv_proj|gate_proj|o_a_proj|o_b_proj|up_proj|down_proj|experts)"


def all_linear_targets(mtp: bool = False, indexer: bool = False) -> str:
    """A `target_modules` regex for every projection that receives gradients from the loss (what "all-linear"
    should mean here): `mtp=True` / `indexer=True` add the MTP block / the indexer, for training with
    `mtp_loss_weight` / `indexer_loss_weight`."""
    excluded = ([] if mtp else [r"(?!.*\.mtp\.)"]) + ([] if indexer else [r"(?!.*\.indexer\.)"])
    extra = (r"|e_proj|h_proj" if mtp else "") + (r"|weights_proj" if indexer else "")
    return r"^" + "".join(excluded) + r".*\." + _TRAINABLE[:-1] + extra + r")$"


def expert_lora_config(**kwargs):
    """`LoraConfig(**kwargs)` with the grouped LoRA layers registered: target `"experts"` and `"o_a_proj"` by
    module name next to the usual linears, e.g. `expert_lora_config(r=16, lora_alpha=32, target_modules=["q_a_proj",
    "q_b_proj", "o_a_proj", "o_b_proj", "experts"])`. `target_modules="all-linear"` becomes `all_linear_targets()`:
    PEFT's own expansion would wrap the indexer and MTP linears, which get no gradient from the loss, and miss the
    routed experts and `o_a_proj`."""
    _require_peft()
    if isinstance(kwargs.get("target_modules"), str) and kwargs["target_modules"].lower() == "all-linear":
        kwargs["target_modules"] = all_linear_targets()
    return register_lora_layers(LoraConfig(**kwargs))


def prepare_lora_config(config):
    """What `expert_lora_config` does, applied to a config the user built: a PEFT `LoraConfig` gets the grouped LoRA
    layers registered (in place) and `target_modules="all-linear"` becomes `all_linear_targets()`; any other PEFT
    config is returned as is. `model.add_adapter` / `load_adapter` pass their config through it."""
    if LoraConfig is None or not isinstance(config, LoraConfig):
        return config
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = all_linear_targets()
    return register_lora_layers(config)


def load_expert_lora(model, path, **kwargs):
    """`PeftModel.from_pretrained(model, path, **kwargs)` for adapters with grouped LoRA layers (the saved config
    cannot carry PEFT's custom-layer registration, so it is added here)."""
    _require_peft()
    config = register_lora_layers(LoraConfig.from_pretrained(path))
    return PeftModel.from_pretrained(model, path, config=config, **kwargs)


def warn_untrained_lora_targets(model: nn.Module) -> list[str]:
    """Warn about LoRA layers on modules no loss trains: the lightning indexer without `indexer_loss_weight` and the
    MTP block without `mtp_loss_weight`. A plain `LoraConfig(target_modules="all-linear")` puts them there (PEFT
    expands "all-linear" by module type); their factors would stay at their initial values. Returns the names found."""
    if LoraConfig is None:  # no PEFT, no LoRA layers (and `LoraLayer` is a placeholder)
        return []
    config = getattr(model, "config", None)
    silent = [part for part, weight in ((".indexer.", "indexer_loss_weight"), (".mtp.", "mtp_loss_weight"))
              if not getattr(config, weight, 0)]  # fmt: skip
    names = [name for name, module in model.named_modules()
             if isinstance(module, LoraLayer) and any(part in f".{name}." for part in silent)]  # fmt: skip
    if names:
        logger.warning(
            "%d LoRA layers sit on modules that no loss trains (e.g. %s): the lightning indexer learns only from "
            "`indexer_loss_weight` and the MTP block only from `mtp_loss_weight`, both 0 here. Their factors will not "
            "change. Target `modeling_deepseek_v4.all_linear_targets()` (what `expert_lora_config(target_modules="
            "'all-linear')` uses) instead of PEFT's 'all-linear', or set those loss weights.",
            len(names),
            names[0],
        )
    return names


@torch.no_grad()
def densify_lora_bases(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace the quantized bases under grouped LoRA layers by dense ones in `dtype` (exact dequantization), so a
    following `merge_and_unload()` merges in `dtype` instead of re-quantizing. Returns how many were replaced."""
    count = 0
    for layer in [m for m in model.modules() if isinstance(m, _GroupedLoraLayer)]:
        base = layer.get_base_layer()
        if not getattr(base, "_quantized_buffers", None):
            continue
        if isinstance(layer, DeepseekV4ExpertsLora):
            gate_up, down = base.dequantized(dtype)
            shape = SimpleNamespace(  # what DeepseekV4Experts reads from a model config
                n_routed_experts=base.num_experts,
                swiglu_limit=base.limit,
                ops_backend=base.backend,
                moe_intermediate_size=down.shape[-1],
                hidden_size=down.shape[-2],
            )
            with torch.device("meta"):
                dense = carry_numerics(DeepseekV4Experts(shape), base)
            dense.gate_up_proj, dense.down_proj = (nn.Parameter(t, requires_grad=False) for t in (gate_up, down))
        else:
            dense = DeepseekV4GroupedLinear(base.in_features, base.out_features, base.n_groups).to("meta")
            dense.weight = nn.Parameter(base.dequantized_weight(dtype), requires_grad=False)
        layer.base_layer = dense
        layer._quantized_backup = None
        count += 1
    return count


__all__ = [
    "all_linear_targets",
    "DeepseekV4ExpertsLora",
    "DeepseekV4GroupedLinearLora",
    "densify_lora_bases",
    "expert_lora_config",
    "load_expert_lora",
    "prepare_lora_config",
    "register_lora_layers",
    "warn_untrained_lora_targets",
]
