"""Tensor-, expert- and pipeline-parallel plans for transformers' distributed engine (`transformers.distributed`).

`DeepseekV4ExtConfig` exposes these dicts as `base_model_tp_plan` / `base_model_ep_plan` / `base_model_pp_plan`, the
class attributes that `from_pretrained(..., distributed_config=DistributedConfig(tp_size=..., ep_size=...))` (or the
deprecated `tp_plan="auto"`) reads; keys are relative to `DeepseekV4ExtModel` and `*` stands for a layer number.

Tensor parallelism (TP), each rank holding `1 / tp_size` of:
- attention heads: `q_b_proj` colwise (its output `[.., H * D]` splits on whole heads), the per-head `sinks` sharded
  alike, the grouped output projection `o_a_proj` by groups of heads (its weight rows `[g * d_g, H * D / g]`, one
  `d_g` block per group, Shard(0)), then `o_b_proj` rowwise, whose partial sums are all-reduced. Needs `tp_size` to
  divide `o_groups` (hence `num_attention_heads`): attention.py checks it. The low-rank `q_a_proj` / `q_a_norm`, the
  single shared KV head (`kv_proj`, `kv_norm`), compressors and the indexer stay replicated (one head: nothing to
  split), so every rank computes the same keys and the same indexer top-k. In training each rank's heads see only
  part of the shared KV head's and the compressed entries' gradient: `SharedKvParallel` (registered here as
  `deepseek_v4_ext_shared_kv`) sums it over the ranks. Not exact under TP: the indexer alignment loss
  (`indexer_loss_weight` > 0) is computed from this rank's heads only.
- the shared expert (`gate_proj` / `up_proj` colwise, `down_proj` rowwise) and the routed experts' intermediate dim
  (as native: `gate_up_proj` packed colwise, gate rows and up rows split alike, `down_proj` rowwise, outputs
  all-reduced by `moe_tp_experts`). The clamped SwiGLU is elementwise in the intermediate dim, so this is exact.
- the vocabulary of `embed_tokens` (added by transformers itself, `embedding_rowwise`) and of `lm_head`
  (`CAUSAL_LM_TP_PLAN`, `colwise_gather_output`).
Routers (score and hash: `tid2eid` is looked up from the replicated `input_ids`), norms, mHC and the MTP block stay
replicated.

Expert parallelism (EP): `E / ep_size` whole experts per rank (`grouped_gemm`, Shard(0) of both banks) reached through
`ep_dispatch_experts`, i.e. transformers' `EPImplementation`s: at inference with `ep_size == tp_size`,
`all_reduce` (every rank runs its experts on the shared batch, routes to other ranks' experts come as local id
`E / ep_size` and are dropped by `DeepseekV4Experts.forward`); otherwise `all_to_all` token exchange. Routing (score
or hash) runs replicated before dispatch, so hash layers need nothing special.

Pipeline parallelism (PP, inference only): transformers splits `layers` evenly over the stages; pipeline_support.py
hands the mHC streams `[B, S, n_hc, d]` from stage to stage (`BASE_MODEL_PP_PLAN` describes it).

Weights kept quantized in buffers (FP8 linears, FP4 / FP8 expert banks, quantized_modules.py) are not parameters,
which this engine alone shards (`_expand_parallel_plan` lists `module.named_parameters(recurse=False)`, styles read
`module._parameters`, shard-on-read `DtensorShardOperation` applies to DTensors): quantized_parallel.py gives them the
same layouts before the weights load. Other buffer storages (bitsandbytes) would load whole on every rank, so that
under `moe_tp_experts` every rank would add its full expert output and the all-reduce would multiply it by
`tp_size`; `refuse_buffer_weights` turns that into an error on the first forward.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import is_torch_distributed_available

# transformers' parallel-style registry; this package adds `SHARED_KV_STYLE` to it (at the end of this file).
SHARED_KV_STYLE = "deepseek_v4_ext_shared_kv"

BASE_MODEL_TP_PLAN = {
    # attention heads; the attention itself runs on its local `sinks` shard (`local_params`)
    "layers.*.self_attn.q_b_proj": "colwise",
    "layers.*.self_attn.sinks": "colwise",
    "layers.*.self_attn": "local_params",
    # the one KV head and the compressed entries feed every head: their gradients are summed over the ranks
    "layers.*.self_attn.kv_norm": SHARED_KV_STYLE,
    "layers.*.self_attn.compressor": SHARED_KV_STYLE,
    # grouped output projection: this rank's groups of heads (weight rows), computed on local tensors
    "layers.*.self_attn.o_a_proj.weight": "colwise",
    "layers.*.self_attn.o_a_proj": "local_params",
    "layers.*.self_attn.o_b_proj": "rowwise",
    # shared expert
    "layers.*.mlp.shared_experts.gate_proj": "colwise",
    "layers.*.mlp.shared_experts.up_proj": "colwise",
    "layers.*.mlp.shared_experts.down_proj": "rowwise",
    # routed experts, as native `deepseek_v4`
    "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
    "layers.*.mlp.experts.down_proj": "rowwise",
    "layers.*.mlp.experts": "moe_tp_experts",
}

BASE_MODEL_EP_PLAN = {
    "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
    "layers.*.mlp.experts.down_proj": "grouped_gemm",
    "layers.*.mlp.experts": "ep_dispatch_experts",
}

# What each pipeline stage takes and gives (`DistributedConfig(pp_size=N)`, inference; pipeline_support.py runs it).
# Descriptive: transformers 5.23 / 5.24 keep it as `model.pp_plan` but split `layers` by count alone. Between stages go
# the mHC streams `[B, S, n_hc, d]` (`hidden_states` here), and every stage reads `input_ids` (hash-routed layers)
# and the mask; the last stage collapses the streams (`hc_head`, then `norm`) and holds the MTP block.
BASE_MODEL_PP_PLAN = {
    "embed_tokens": (["input_ids"], ["inputs_embeds"]),
    "layers": (["hidden_states", "input_ids", "attention_mask"], ["hidden_states"]),
    "hc_head": (["hidden_states"], ["hidden_states"]),
    "norm": (["hidden_states"], ["hidden_states"]),
}

# For `DeepseekV4ExtForCausalLM._tp_plan` / `_pp_plan` (keys relative to the causal LM).
# FSDP2 (`DistributedConfig(fsdp_size=...)`): each decoder layer and the MTP block its own unit (freed after use;
# transformers' default plan leaves the MTP block in the root unit, never freed), the final norm and head kept whole.
BASE_MODEL_FSDP_PLAN = {
    "embed_tokens": "free_full_weight",
    "layers.*": "free_full_weight",
    "mtp.*": "free_full_weight",
    "norm": "keep_full_weight",
}
CAUSAL_LM_FSDP_PLAN = {"lm_head": "keep_full_weight"}
CAUSAL_LM_TP_PLAN = {"lm_head": "colwise_gather_output"}
CAUSAL_LM_PP_PLAN = {"lm_head": (["hidden_states"], ["logits"])}


def refuse_buffer_weights(*modules: nn.Module) -> None:
    """Raise if transformers' TP / EP engine hooked (`_is_hooked`, set by `apply_tensor_parallelism` /
    `apply_expert_parallelism`) one of `modules` whose weights are quantized buffers (`_quantized_buffers`)."""
    for module in modules:
        sharded = getattr(module, "_buffers_sharded", False)  # FP8 / FP4 storage: quantized_parallel.py
        if getattr(module, "_is_hooked", False) and getattr(module, "_quantized_buffers", ()) and not sharded:
            raise NotImplementedError(
                f"{type(module).__name__} keeps its weights quantized in buffers "
                f"({', '.join(module._quantized_buffers)}), and transformers' tensor / expert parallelism shards "
                "nn.Parameters only: the buffers would load whole on every rank and the sharded forward would be "
                "wrong. For tp_size / ep_size > 1 keep the official FP8 / FP4 storage (`dsv4-convert --dtype "
                "keep`, sharded like the dense weights) or load a dense copy (`dsv4-convert to-hf --dtype bf16`)."
            )


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over `group`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


if is_torch_distributed_available():
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
    from transformers.distributed.tensor_parallel import TensorParallelLayer

    class SharedKvParallel(TensorParallelLayer):
        """The output (the shared KV head `[B, S, D]` or the compressed entries `[B, N, D]`), replicated on every
        rank, is read by this rank's heads only, so its gradient here is this rank's part: backward sums it over the
        TP ranks (as transformers' `mla_kv_a_proj` does for MLA's shared RoPE key). Forward and inference: identity."""

        def transform_output_post_forward(self, module, output, mesh):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return output
            return _SumGradOverRanks.apply(output, mesh.get_group())

    ALL_PARALLEL_STYLES.register(SHARED_KV_STYLE, SharedKvParallel())


def local_tensor(t):
    """A DTensor bank (expert parallelism: `Shard(0)` over the EP mesh) as this rank's `[E_local, ...]` tensor (grouped
    expert LoRA under EP, `expert_lora.py`)."""
    return t.to_local() if hasattr(t, "to_local") else t


def rewrap_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`local` as a DTensor with `like`'s mesh, placements and global shape when `like` is a DTensor (a sharded
    quantized buffer after a device move, quantized_modules.py), else `local` itself."""
    if not hasattr(like, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def expert_group(base: nn.Module):
    """The EP process group of experts sharded by transformers' `grouped_gemm` (their banks are DTensors), or None."""
    bank = getattr(base, "gate_up_proj", None) if getattr(base, "_is_expert_parallel", False) else None
    return row_shard_group(bank)


def row_shard_group(t):
    """The process group over which the DTensor `t`'s rows (dim 0) are split, or None (a plain tensor, rows whole):
    expert banks under EP (this rank's experts), `o_a_proj`'s weight under TP (this rank's head groups)."""
    mesh = getattr(t, "device_mesh", None)
    if mesh is None:
        return None
    for dim, placement in enumerate(t.placements):
        if placement.is_shard(0):
            return mesh.get_group(dim)
    return None


class SumGradients(torch.autograd.Function):
    """Identity whose backward sums the gradient over `group` (a replicated tensor, each rank using it on its part)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        torch.distributed.all_reduce(grad := grad.contiguous(), group=ctx.group)
        return grad, None
