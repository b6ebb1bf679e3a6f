"""DeepSeekMoE of DeepSeek-V4 (tech report §2.1; official `inference/model.py`, `Gate` / `Expert` / `MoE`).

- Router in fp32: logits `x W^T`, scores `sqrt(softplus(l))` (`sqrtsoftplus`); score-routed layers choose the
  top-k of `scores + e_score_correction_bias` (the bias only chooses), hash layers take `tid2eid[input_id]`.
  Weights `s[idx] / sum s[idx] * routed_scaling_factor` (reference normalization, no eps).
- Experts: clamped SwiGLU (`swiglu_limit`) in fp32, routing weight applied to h before `down_proj`, routed
  outputs accumulated in fp32, plus one unrouted shared expert (clamped too).
Names match transformers' native port: `mlp.gate.weight`, `mlp.gate.e_score_correction_bias` / `mlp.gate.tid2eid`,
`mlp.experts.gate_up_proj [E, 2I, d]` (gate rows first), `mlp.experts.down_proj [E, d, I]`,
`mlp.shared_experts.{gate,up,down}_proj`. Experts read their parameters at call time (PEFT, quantized modules).
The routed experts also take transformers' `experts_implementation` (`eager` = this package's op, `grouped_mm`,
`batched_mm`; `experts_interface.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts_interface import TransformersExpertsAttributes, transformers_experts_forward, warn_if_ignored
from .ops import grouped_experts
from .parallel_plans import refuse_buffer_weights

_SCORE_FUNCTIONS = {
    "sqrtsoftplus": lambda logits: torch.sqrt(F.softplus(logits)),
    "softmax": lambda logits: torch.softmax(logits, dim=-1),
    "sigmoid": torch.sigmoid,
}


class DeepseekV4TopKRouter(nn.Module):
    """Score-routed gate: `weight [E, d]`, selection bias buffer `e_score_correction_bias [E]`."""

    is_hash = False

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.score_fn = _SCORE_FUNCTIONS[config.scoring_func]
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x `[T, d]` -> fp32 scores `[T, E]`."""
        return self.score_fn(F.linear(x.float(), self.weight.float()))

    def select(self, scores: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        return torch.topk(scores + self.e_score_correction_bias.float(), self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None):
        """x `[T, d]` -> (scores `[T, E]`, weights `[T, K]` fp32, indices `[T, K]`)."""
        scores = self.scores(x)
        indices = self.select(scores, input_ids)
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(dim=-1, keepdim=True) * self.routed_scaling_factor
        return scores, weights, indices


class DeepseekV4HashRouter(DeepseekV4TopKRouter):
    """Hash-routed gate of the first `num_hash_layers` layers: experts are `tid2eid [vocab, K]` of the token id."""

    is_hash = True

    def __init__(self, config):
        super().__init__(config)
        del self.e_score_correction_bias
        self.tid2eid = nn.Buffer(torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))

    def select(self, scores: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError(
                "This DeepSeek-V4 layer is hash-routed (experts come from `tid2eid[input_id]`), so it needs "
                "`input_ids`: pass them together with `inputs_embeds` (to the model or to `generate`)."
            )
        return self.tid2eid[input_ids.reshape(-1)].long()


class DeepseekV4Experts(TransformersExpertsAttributes, nn.Module):
    """Routed experts stored as 3-D tensors (`gate_up_proj [E, 2I, d]`, `down_proj [E, d, I]`). `forward` dispatches
    on `config._experts_implementation` at call time, like transformers' `@use_experts_implementation` classes."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # read at call time: `set_experts_implementation` changes the shared model config
        self.num_experts = config.n_routed_experts
        self.limit = config.swiglu_limit
        self.backend = config.ops_backend
        inter = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * inter, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, inter))
        self.reference_numerics = False  # R1: FP8 round trip of x and h in the expert loop (reference_numerics.py)

    compute_dtype: torch.dtype | None = None  # storage formats with a fixed compute dtype (bitsandbytes) set it

    def expert_banks(self, dtype: torch.dtype):
        """The banks as `grouped_experts` reads them, `[E, 2I, d]` and `[E, d, I]`: here the parameters, read at
        call time (PEFT parametrizations); quantized / QAT variants return views that dequantize what is indexed."""
        return self.gate_up_proj, self.down_proj

    def forward(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        static_shapes: bool = False,
        lora: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x `[T, d]`, indices/weights `[T, K]` -> `[T, d]` fp32. `lora`: grouped LoRA factors (`lora_a13`,
        `lora_b13`, `lora_a2`, `lora_b2`, see `ops_reference.grouped_experts`), passed by `expert_lora.py`."""
        refuse_buffer_weights(self)
        if lora is None:  # set for one call by `expert_lora.py` when a transformers EP hook owns `forward` (3 args)
            lora = getattr(self, "_lora_factors", None)
        if getattr(self, "_is_expert_parallel", False) and bool((indices >= self.num_experts).any()):
            # transformers' `all_reduce` expert parallelism marks routes to other ranks' experts with the local id
            # `num_experts` (this rank's count, set by `grouped_gemm`): run this rank's routes only, one per row.
            rows, slot = torch.nonzero(indices < self.num_experts, as_tuple=True)
            routed = (x[rows], indices[rows, slot, None], weights[rows, slot, None])
            out = DeepseekV4Experts.forward(self, *routed, lora=lora)
            return out.new_zeros(x.shape[0], out.shape[-1]).index_add_(0, rows, out)
        transformers_forward = transformers_experts_forward(self, lora)
        if transformers_forward is not None:
            # transformers returns x's dtype; this contract is the fp32 accumulation (fp64 for fp64 x)
            return transformers_forward(self, x, indices, weights).to(torch.promote_types(x.dtype, torch.float32))
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        gate_up, down = self.expert_banks(x.dtype)
        return grouped_experts(
            x,
            gate_up,
            down,
            indices,
            weights,
            self.limit,
            backend=self.backend,
            static_shapes=static_shapes,
            act_quant=self.reference_numerics,
            **(lora or {}),
        )


class DeepseekV4MLP(nn.Module):
    """The shared expert: clamped SwiGLU MLP of width `moe_intermediate_size`."""

    def __init__(self, config):
        super().__init__()
        inter = config.moe_intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)
        self.limit = config.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x).float().clamp(max=self.limit)
        up = self.up_proj(x).float().clamp(min=-self.limit, max=self.limit)
        return self.down_proj((F.silu(gate) * up).to(x.dtype))


class DeepseekV4SparseMoeBlock(nn.Module):
    """Router + routed experts + one shared expert. Returns the output and the router scores (for aux losses)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.is_hash = config.is_hash_layer(layer_idx)
        self.gate = DeepseekV4HashRouter(config) if self.is_hash else DeepseekV4TopKRouter(config)
        self.experts = DeepseekV4Experts(config)
        self.shared_experts = DeepseekV4MLP(config)

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor | None = None, static_shapes: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x `[B, S, d]` -> (`[B, S, d]`, (scores `[B*S, E]`, indices `[B*S, K]`))."""
        flat = x.reshape(-1, x.shape[-1])
        scores, weights, indices = self.gate(flat, input_ids)
        warn_if_ignored(self.experts, getattr(self.config, "_experts_implementation", None))
        # `static_shapes` only picks the algorithm; a transformers TP / EP hook may take (x, indices, weights) only
        routed = self.experts(
            flat, indices, weights, *(() if getattr(self.experts, "_is_hooked", False) else (static_shapes,))
        )
        out = (routed + self.shared_experts(flat).float()).to(x.dtype)
        return out.view_as(x), (scores, indices)


def default_tid2eid(shape: torch.Size, num_experts: int) -> torch.Tensor:
    """Deterministic balanced hash table for random init and new tokens: token t -> K consecutive experts from a
    hashed start. `shape` is `[vocab, K]`."""
    vocab, k = shape
    first = (torch.arange(vocab, dtype=torch.long) * 40503) % num_experts
    return (first.unsqueeze(1) + torch.arange(k)) % num_experts
