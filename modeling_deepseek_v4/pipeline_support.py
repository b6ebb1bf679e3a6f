"""Pipeline parallelism at inference: `from_pretrained(..., distributed_config=DistributedConfig(pp_size=N))`.

transformers' engine (`transformers.distributed.pipeline_parallel`) splits `model.layers` evenly across the PP ranks,
replaces the layers, `embed_tokens`, `norm` and `lm_head` a stage does not own by `PipelineIdentityLayer` (which
returns its first argument) and wraps `forward` in a naive schedule that hands `last_hidden_state` `[B, S, d]` to the
next stage as `inputs_embeds`, without `input_ids`. That does not fit this model: between two layers its state is the
mHC residual streams `[B, S, n, d]` (n = `hc_mult`), the hash-routed layers pick experts by token id on every stage,
the base model collapses the streams (`hc_head`, then `norm`) only at its end, and a decoder layer returns `(streams,
router)`, not one tensor. So, after the engine has split the model (`PipelineParallelMixin`):

- on every stage but the last, `hc_head` becomes an identity too, and the MTP block and the DSpark drafter (which read
  the final streams and the head) are dropped; their checkpoint keys are owned by the last stage (the engine's
  `find_rank_for_key` knows only embedding, layers, norm and head), so no stage reports them as unexpected;
- the engine's forward is replaced by `pipeline_forward`: the first stage embeds and runs its layers; each stage sends
  its streams `[B, S, n, d]` (original token order) to the next one, which runs its layers from them with the same
  `input_ids`, attention mask, positions and cache (`DeepseekV4ExtModel.forward(input_streams=...)`, which skips
  the layers of other stages); the last stage applies `hc_head`, `norm` and `lm_head`, and the fp32 logits are
  broadcast to every rank, so `generate` runs unchanged on all of them. Each rank's `DeepseekV4Cache` holds the state
  of its own layers only; its token counts advance identically on every stage.

With `tp_size > 1` too, each stage shards only its own modules (`_resolve_parallel_plans` drops the plan entries of
other stages; transformers would look them up and fail). The schedule is transformers' naive one: one stage works at
a time, so this buys capacity (each rank holds about 1 / N of the layers), not speed. Not supported under PP (each
raises `NotImplementedError`): training and `labels` (the engine has no backward across stages), the static cache,
packed sequences, MTP / DSpark speculative decoding (`return_streams`), and `output_hidden_states` /
`output_router_logits`. `save_pretrained` from every rank writes the whole model (the stages' tensors joined on the
first stage).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from .compat import cache_kwargs, cache_of, pick_cache
from .packing import packed_spans
from .static_cache import DeepseekV4StaticCache

# Base-model modules that read the final streams: on the last stage only (with `norm`, which the engine places there).
LAST_STAGE_MODULES = ("hc_head", "mtp", "dspark")
# dtypes the streams may travel in; the receiving stage learns which one from a one-element header.
STREAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class PipelineParallelMixin:
    """`PreTrainedModel` mixin: after transformers' `apply_pipeline_parallelism`, make each stage hand over the mHC
    streams (`prepare_pipeline_stage`)."""

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        pipelined = mesh_manager is not None and distributed_config is not None and distributed_config.pp_size > 1
        if pipelined and getattr(model, "lm_head", None) is None:
            raise NotImplementedError(
                f"Pipeline parallelism (pp_size={distributed_config.pp_size}) runs DeepseekV4ExtForCausalLM only: the "
                f"last stage computes the logits. Load {type(model).__name__} without pp_size, or the causal LM."
            )
        model = super().maybe_distribute_model(model, distributed_config, mesh_manager)
        if pipelined:
            prepare_pipeline_stage(model)
        return model

    def _resolve_parallel_plans(self, distributed_config):
        """The TP / EP / FSDP plans, under PP only the entries of this stage's modules: transformers resolves the
        plans for the whole model, then splits it, then shards every plan entry, so with `tp_size > 1` a stage
        would look for the embedding or layers another stage holds (KeyError)."""
        plans = super()._resolve_parallel_plans(distributed_config)
        mesh_manager = getattr(self, "_mesh_manager", None)
        if distributed_config is None or distributed_config.pp_size <= 1 or mesh_manager is None:
            return plans
        from transformers.distributed.pipeline_parallel import PipelineStage

        stage, prefix = PipelineStage(mesh_manager.get_mesh("pp")), self.base_model_prefix
        num_layers = len(getattr(self, prefix).layers)

        def here(name: str) -> bool:
            owner = owning_stage(stage, f"{name}.", num_layers, prefix)
            return owner is None or owner == stage.pp_rank

        return tuple({name: style for name, style in plan.items() if here(name)} for plan in plans)

    def gather_sharded_state_dict_for_save(self, model_to_save, state_dict, distributed_config, **kwargs):
        """As transformers' (TP / FSDP shards gathered), and under PP the stages' state dicts joined on the first
        stage: each stage holds only its own modules, so transformers alone writes rank 0's layers and silently leaves
        the rest out. A collective over the PP group (every rank calls `save_pretrained`, as for TP); the whole model
        passes through the first stage's CPU memory, as it does for a TP save."""
        stage = getattr(model_to_save, "_pp_stage", None)
        if stage is None or stage.pp_size <= 1:
            return super().gather_sharded_state_dict_for_save(model_to_save, state_dict, distributed_config, **kwargs)
        writes = kwargs.pop("save_on_this_rank", True)
        # every stage keeps its gathered TP shards (transformers empties them on ranks that do not write)
        state_dict = super().gather_sharded_state_dict_for_save(
            model_to_save, state_dict, distributed_config, save_on_this_rank=True, **kwargs
        )
        local = {key: _as_bytes(value) for key, value in state_dict.items()}
        parts = [None] * stage.pp_size if stage.pp_is_first_stage else None
        first = torch.distributed.get_global_rank(stage.pp_group, 0)
        torch.distributed.gather_object(local, parts, dst=first, group=stage.pp_group)
        if not (stage.pp_is_first_stage and writes):
            return {}
        return {key: _from_bytes(*value) for part in parts for key, value in part.items()}


def _as_bytes(tensor: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], torch.Tensor]:
    """(dtype, shape, uint8 bytes on the CPU): float8 / E8M0 tensors (kept FP8 / FP4 weights) do not survive the
    pickling `gather_object` uses, bytes do."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return tensor.dtype, tuple(tensor.shape), flat.view(torch.uint8)


def _from_bytes(dtype: torch.dtype, shape: tuple[int, ...], data: torch.Tensor) -> torch.Tensor:
    return data.view(dtype).reshape(shape)


def owning_stage(stage, key: str, num_layers: int, base_model_prefix: str) -> int | None:
    """The PP rank holding checkpoint key `key`: the engine's rule (embedding first, layers by range, norm and head
    last), plus `hc_head`, the MTP block and the DSpark drafter on the last stage; None for keys of every stage."""
    owner = type(stage).find_rank_for_key(stage, key, num_layers, base_model_prefix)
    if owner is None and key.startswith(tuple(f"{base_model_prefix}.{m}." for m in LAST_STAGE_MODULES)):
        return stage.pp_size - 1
    return owner


def prepare_pipeline_stage(model: nn.Module) -> None:
    """Drop the final-streams modules on stages before the last, teach the stage who owns their checkpoint keys and
    install `pipeline_forward` as `model.forward` (same signature, so `generate` passes the same arguments)."""
    from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

    stage, base = model._pp_stage, getattr(model, model.base_model_prefix)
    if not stage.pp_is_last_stage:
        base.hc_head = PipelineIdentityLayer()
        base.mtp = nn.ModuleList()
        base.dspark = None
    stage.find_rank_for_key = functools.partial(owning_stage, stage)
    signature_of = type(model).forward.__get__(model)
    signature = inspect.signature(signature_of)

    @functools.wraps(signature_of)
    def forward(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        extra = arguments.pop("kwargs", {})
        return pipeline_forward(model, **arguments, **extra)

    model.forward = forward


def send_streams(stage, streams: torch.Tensor) -> None:
    """Send `streams [B, S, n, d]` to the next stage: a dtype header, then the tensor (whose shape the receiver
    knows)."""
    code = torch.tensor([STREAM_DTYPES.index(streams.dtype)], device=streams.device)
    stage.communicate("send_forward", device=streams.device, dtype=torch.long, tensor=code)
    stage.communicate("send_forward", device=streams.device, dtype=streams.dtype, tensor=streams)


def recv_streams(stage, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The previous stage's streams `shape = [B, S, n, d]`, in the dtype it computed them in, on `device`."""
    code = stage.communicate("recv_forward", device=device, dtype=torch.long, shape=(1,))
    return stage.communicate("recv_forward", device=device, dtype=STREAM_DTYPES[int(code)], shape=shape)


def _refuse_unsupported(model, labels, return_streams, output_hidden_states, output_router_logits, cache, spans):
    if labels is not None or (model.training and torch.is_grad_enabled()):
        raise NotImplementedError(
            "Training (a forward with labels or with gradients in train mode) is not supported under pipeline "
            "parallelism: transformers' pipeline schedule has no backward across stages. Use TP / EP / FSDP2 "
            "(DistributedConfig(tp_size=..., ep_size=..., fsdp_size=...)) for training, or compute a loss from the "
            "logits of a no-grad forward."
        )
    unsupported = {
        "MTP / DSpark speculative decoding (return_streams)": bool(return_streams),
        "output_hidden_states=True": bool(output_hidden_states),
        "output_router_logits=True": bool(output_router_logits),
        "the static cache (cache_implementation='static')": isinstance(cache, DeepseekV4StaticCache),
        "packed sequences (restarting position_ids / cu_seq_lens_q)": spans is not None,
    }
    asked = [name for name, used in unsupported.items() if used]
    if asked:
        raise NotImplementedError(
            f"Not supported under pipeline parallelism: {', '.join(asked)}. The stages return the logits only."
        )


def pipeline_forward(
    model,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values=None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    output_hidden_states: bool | None = None,
    output_router_logits: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    return_streams: bool | int = False,
    cache=None,
    **kwargs,
):
    """`DeepseekV4ExtForCausalLM.forward` on one pipeline stage: receive the previous stage's streams `[B, S, n, d]`
    (not on the first), run this stage's layers, send the streams on (not on the last); the last stage computes the
    fp32 logits `[B, S', V]`, which every rank returns, with its own cache."""
    from .modeling_deepseek_v4 import DeepseekV4CausalLMOutput

    stage = model._pp_stage
    cache = pick_cache(cache, past_key_values)
    return_dict = kwargs.pop("return_dict", True)
    spans = packed_spans(position_ids, attention_mask, kwargs)
    _refuse_unsupported(model, labels, return_streams, output_hidden_states, output_router_logits, cache, spans)
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is None:
        raise ValueError("Pass `input_ids` [batch, tokens] or `inputs_embeds` [batch, tokens, hidden].")
    config = model.config
    shape = (*tokens.shape[:2], config.hc_mult, config.hidden_size)
    streams = None if stage.pp_is_first_stage else recv_streams(stage, shape, tokens.device)
    out = getattr(model, model.base_model_prefix)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        cache=cache,
        use_cache=use_cache,
        output_hidden_states=False,
        output_router_logits=False,
        input_streams=streams,
        return_dict=True,
        **kwargs,
    )
    logits = None
    if stage.pp_is_last_stage:  # as DeepseekV4ExtForCausalLM.forward: fp32 logits of the kept positions
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden = out.last_hidden_state[:, keep]
        logits = model.lm_head(hidden.to(model.lm_head.weight.dtype)).float()
    else:  # before the last stage `hc_head` and `norm` are identities: the output is the streams [B, S, n, d]
        send_streams(stage, out.last_hidden_state)
    logits = stage.broadcast_from_last(logits, dtype=torch.float32, device=tokens.device)
    output = DeepseekV4CausalLMOutput(logits=logits, **cache_kwargs(cache_of(out)))
    return output if return_dict else output.to_tuple()


__all__ = ["PipelineParallelMixin", "pipeline_forward", "prepare_pipeline_stage"]
