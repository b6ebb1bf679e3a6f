"""transformers' experts interface (`experts_implementation`) for the routed experts of this package.

transformers 5.23 / 5.24 (`integrations/moe.py`) swap an experts module's `forward(hidden_states, top_k_index,
top_k_weights)` for the function named by `config._experts_implementation`; `grouped_mm` (sort by expert,
`F.grouped_mm` or a per-expert `torch.mm` loop as fallback) and `batched_mm` (gather each token's expert weights,
`torch.bmm`) read `gate_up_proj [E, 2I, d]` (gate rows first, `has_gate`, not `is_transposed`), `down_proj
[E, d, I]`, `num_experts`, `_is_expert_parallel` and call `self._apply_gate(gate_up)` for the activation. With
DeepSeek-V4's `_apply_gate` (clamped SwiGLU `silu(min(g, limit)) * clamp(u, -limit, limit)`, here in fp32 as in
this package's op) they compute the same function as `ops.grouped_experts` on dense banks: only the place of the
routing weight (after `down_proj` instead of on h before it) and the rounding order differ, so fp32 results agree to
float rounding; in bf16 the two matmul chains round differently (transformers keeps the matmuls in the weight dtype).

Choices accepted by this model: `eager` (the default: this package's `ops.grouped_experts`, with its backends,
`static_shapes`, grouped LoRA, reference numerics and quantized banks), `grouped_mm` and `batched_mm`. Everything
else (`deepgemm`, `sonicmoe`, FP8 / MegaMoE names, names registered later) raises at `from_pretrained` /
`set_experts_implementation`, since nothing here checks that they apply the clamp. transformers makes `grouped_mm`
the default of any model that opts in; this model keeps `eager` as its default instead (`get_correct_...` below).
Banks that transformers' functions cannot read (quantized, bitsandbytes, QAT fake-quantized), grouped LoRA factors
and reference numerics stay on this package's op, with a one-time warning naming the module and the reason.
The choice is runtime state like `attn_implementation`: transformers does not write it to `config.json`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.utils import logging

logger = logging.get_logger(__name__)

EAGER = "eager"
TRANSFORMERS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")
SUPPORTED_IMPLEMENTATIONS = (EAGER, *TRANSFORMERS_IMPLEMENTATIONS)


def _transformers_function(name: str) -> Callable:
    # Imported on use: `integrations.moe` registers torch.library ops at import, which plain eager runs never need.
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS[name]


def requested_implementation(module) -> str | None:
    """The `experts_implementation` a module's config asks for (`None` when it has no config, e.g. quantized banks
    swapped in after loading, or dense banks built from a plain namespace)."""
    return getattr(getattr(module, "config", None), "_experts_implementation", None)


class TransformersExpertsAttributes:
    """What `grouped_mm_experts_forward` / `batched_mm_experts_forward` read from an experts module besides its
    banks, as `@use_experts_implementation` sets them: concatenated gate-first `gate_up_proj [E, 2I, d]` without
    bias or post-expert norm. `_is_expert_parallel` is turned on per instance by transformers' expert-parallel plan
    (`distributed/expert_parallel.py`), after which the functions mask the sentinel ids `>= num_experts`."""

    has_gate = True
    has_bias = False
    is_transposed = False
    is_concatenated = True
    has_post_expert_norm = False
    _is_expert_parallel = False

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up `[S, 2I]` (gate first) -> `[S, I]` in gate_up's dtype: the clamped SwiGLU in fp32 (fp64 for
        fp64 inputs), like `ops_reference._swiglu`."""
        gate, up = gate_up.to(torch.promote_types(gate_up.dtype, torch.float32)).chunk(2, dim=-1)
        limit = self.limit
        return (F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)).to(gate_up.dtype)


def _plugin_only_reason(module, lora) -> str | None:
    """Why `module` (a `DeepseekV4Experts` or subclass) cannot run transformers' functions, or None if it can."""
    from .moe import DeepseekV4Experts  # moe.py imports this file

    if type(module).expert_banks is not DeepseekV4Experts.expert_banks or module.compute_dtype is not None:
        return "its banks are not dense tensors (quantized / fake-quantized / bitsandbytes storage)"
    if lora is not None:
        return "grouped LoRA factors are applied inside this package's op"
    if module.reference_numerics:
        return "reference numerics (FP8 round trip of x and h) exist only in this package's op"
    return None


def warn_plugin_only(module, implementation: str, reason: str) -> None:
    logger.warning_once(
        f"experts_implementation={implementation!r} is not used by {type(module).__name__}: {reason}. These "
        "experts run this package's grouped op (`eager`), which computes the same clamped SwiGLU experts."
    )


def transformers_experts_forward(module, lora: dict | None = None) -> Callable | None:
    """transformers' experts function for `module` under its config's choice, or None for this package's op (the
    choice is `eager` / unset, or the module cannot run it: one-time warning)."""
    implementation = requested_implementation(module)
    if implementation is None or implementation == EAGER:
        return None
    if implementation not in TRANSFORMERS_IMPLEMENTATIONS:
        # Only reachable when the config was edited by hand: the model's check refuses these names.
        raise ValueError(_unsupported_message(implementation, type(module).__name__))
    reason = _plugin_only_reason(module, lora)
    if reason is not None:
        warn_plugin_only(module, implementation, reason)
        return None
    return _transformers_function(implementation)


def warn_if_ignored(experts, implementation: str | None) -> None:
    """Called by the MoE block with its config's choice: warn once when the experts module in place (quantized /
    bitsandbytes banks swapped in after the model was built) does not see that choice itself. PEFT wrappers are
    looked through (`get_base_layer`): a dense base under them dispatches, and explains itself, on its own."""
    if implementation not in TRANSFORMERS_IMPLEMENTATIONS:
        return
    base = experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts
    if requested_implementation(base) != implementation:
        warn_plugin_only(base, implementation, "this experts module has no transformers implementation")


def _unsupported_message(implementation, owner: str) -> str:
    allowed = ", ".join(f'"{name}"' for name in SUPPORTED_IMPLEMENTATIONS)
    return (
        f"experts_implementation={implementation!r} is not supported by {owner}. "
        f"DeepSeek-V4 experts accept {allowed}: "
        '"eager" (default) is this package\'s grouped op; "grouped_mm" / "batched_mm" are transformers\' '
        "implementations with DeepSeek-V4's clamped SwiGLU, for dense expert banks."
    )


class ExpertsImplementationMixin:
    """`PreTrainedModel` mixin: opts the model into `experts_implementation` / `set_experts_implementation`.

    transformers decides whether a model may set it by searching the model class's module source for the literal
    decorator name (`_can_set_experts_implementation`); this model's experts live in `moe.py`, so the classmethod
    says yes directly. `get_correct_experts_implementation` (called by `PreTrainedModel.__init__` and
    `set_experts_implementation`) keeps `eager` as the default where transformers would pick `grouped_mm`, and
    refuses names whose maths nobody checked here."""

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        implementation = EAGER if requested_experts is None else requested_experts
        if implementation not in SUPPORTED_IMPLEMENTATIONS:
            raise ValueError(_unsupported_message(implementation, type(self).__name__))
        return implementation
