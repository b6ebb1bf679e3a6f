"""DeepSeek-V4 model wiring: base model, causal LM and the MTP head (tech report §2; official
`inference/model.py`, `Transformer`; the decoder and MTP blocks are in `decoder_layer.py`).

Only wiring lives here; the maths is in `ops_reference.py` behind `ops.py`. Deviations from transformers' native
`deepseek_v4` (forward-math.md §10): padding-aware batches (row 15: pads never enter windows, the indexer or
attention), memory-bounded attention (row 16), lowest-index tie-break in the indexer (row 18), MTP kept (row 14),
fp32 router / SwiGLU / compressor / mHC / logits islands (rows 1, 4, 7-10).

Padding: each call works on a *compacted* batch where every row's real tokens come first. Per-token ops do not
care about order; attention and compressors then see contiguous positions per row. Outputs are put back in the
caller's order at the end, so left-padded `generate` gives, for each sequence, what it gives alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple, logging

from .attention import DeepseekV4Attention, DeepseekV4GroupedLinear
from .batch_meta import BatchMeta
from .cache import DeepseekV4Cache
from .compat import cache_kwargs, pick_cache, with_cache_aliases
from .compressor import DeepseekV4HCACompressor
from .configuration_deepseek_v4 import DeepseekV4ExtConfig
from .decoder_layer import DeepseekV4DecoderLayer, DeepseekV4MTPLayer
from .deepspeed_support import mark_zero3_leaf_modules
from .dspark import DeepseekV4DSparkDrafter
from .expert_lora import warn_untrained_lora_targets
from .experts_interface import ExpertsImplementationMixin
from .generation_hooks import DeepseekV4GenerationHooks
from .hyper_connection import DeepseekV4HyperConnection, DeepseekV4HyperHead
from .losses import router_balance_loss
from .model_inputs import check_inputs, rows_gather, valid_tokens, warn_ignored_requests
from .moe import (
    DeepseekV4Experts,
    DeepseekV4HashRouter,
    DeepseekV4TopKRouter,
    default_tid2eid,
)
from .norm import DeepseekV4RMSNorm
from .packing import PACKING_KWARGS, forward_packed, mask_document_starts, packed_spans
from .parallel_plans import CAUSAL_LM_FSDP_PLAN, CAUSAL_LM_PP_PLAN, CAUSAL_LM_TP_PLAN
from .pipeline_support import PipelineParallelMixin
from .pretrained_io import DeepseekV4PretrainedIO
from .quantized_modules import build_quantized_modules, init_quantized_module
from .quantized_parallel import QuantizedParallelMixin
from .reference_numerics import set_reference_numerics
from .rope import RopeTables
from .static_cache import DeepseekV4StaticCache

logger = logging.get_logger(__name__)


@with_cache_aliases
@dataclass
class DeepseekV4ModelOutput(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus the final residual streams `[B, S, n, d]` (for MTP) when requested and the
    mean indexer alignment loss of the CSA layers (training with `indexer_loss_weight` > 0)."""

    last_streams: torch.Tensor | None = None
    indexer_loss: torch.Tensor | None = None


@with_cache_aliases
@dataclass
class DeepseekV4CausalLMOutput(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus `last_streams` `[B, S', n, d]` when `forward(return_streams=...)` asks and
    `mtp_loss` (the MTP block's loss, already weighted into `loss`) when `config.mtp_loss_weight` > 0."""

    last_streams: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    indexer_loss: torch.Tensor | None = None


class DeepseekV4ExtPreTrainedModel(
    QuantizedParallelMixin, PipelineParallelMixin, ExpertsImplementationMixin, DeepseekV4PretrainedIO, PreTrainedModel
):
    config: DeepseekV4ExtConfig
    config_class = DeepseekV4ExtConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV4DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    # The cache rolls back exactly (`DeepseekV4Cache.crop`), so assisted and prompt-lookup decoding are allowed.
    _is_stateful = False
    _keep_in_fp32_modules_strict = [
        "attn_hc",
        "ffn_hc",
        "hc_head",
        "sinks",
        "position_bias",
        "e_score_correction_bias",
        "q_a_norm",
        "kv_norm",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
        # The MTP block's norms: transformers' loader matches "norm" inside "enorm" / "hnorm" (substring) and keeps
        # them fp32 anyway; named here so that the list says so to tools that match whole module names.
        "enorm",
        "hnorm",
        # fp32 compressor projections like the reference (forward-math.md §8); they are small.
        "compressor.kv_proj",
        "compressor.gate_proj",
        "indexer.kv_proj",
        "indexer.gate_proj",
    ]

    def post_init(self):
        """As transformers', and the fp32 islands stay fp32 when the model is built under a half default dtype
        (`from_pretrained` keeps `_keep_in_fp32_modules_strict` in fp32 itself; direct construction did not)."""
        super().post_init()
        mark_zero3_leaf_modules(self)  # ZeRO-3: each MoE block gathers as one unit (deepspeed_support.py)
        if torch.get_default_dtype() in (torch.float16, torch.bfloat16):
            keep = re.compile("|".join(map(re.escape, self._keep_in_fp32_modules_strict)))
            for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
                if keep.search(name) and tensor.dtype in (torch.float16, torch.bfloat16):
                    tensor.data = tensor.data.float()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if init_quantized_module(module, std):
            return
        super()._init_weights(module)
        if isinstance(module, DeepseekV4TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, DeepseekV4HashRouter):
                init.copy_(module.tid2eid, default_tid2eid(module.tid2eid.shape, module.num_experts))
            else:
                init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, DeepseekV4Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, DeepseekV4GroupedLinear):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DeepseekV4Attention):
            init.zeros_(module.sinks)
        elif isinstance(module, DeepseekV4HyperConnection):
            init.normal_(module.fn, mean=0.0, std=std)
            init.zeros_(module.base)
            init.ones_(module.scale)
        elif isinstance(module, DeepseekV4HyperHead):
            init.normal_(module.hc_fn, mean=0.0, std=std)
            init.zeros_(module.hc_base)
            init.ones_(module.hc_scale)
        elif isinstance(module, DeepseekV4HCACompressor):
            init.zeros_(module.position_bias)


class DeepseekV4ExtModel(DeepseekV4ExtPreTrainedModel):
    """Embeddings -> n_hc streams -> decoder layers -> `hc_head` -> `norm`. Holds the MTP blocks as `mtp.*`."""

    def __init__(self, config: DeepseekV4ExtConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeepseekV4DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekV4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hc_head = DeepseekV4HyperHead(config)
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList(DeepseekV4MTPLayer(config, n + i) for i in range(config.num_nextn_predict_layers))
        # DSpark releases (0731) keep a drafter under the official mtp.* instead of the MTP block (dspark.py).
        self.dspark = DeepseekV4DSparkDrafter(config, DeepseekV4DecoderLayer) if config.dspark_num_stages else None
        self.rope_tables = RopeTables(config.rope_parameters, config.qk_rope_head_dim)
        self.gradient_checkpointing = False
        build_quantized_modules(self, config)
        if config.reference_numerics:
            set_reference_numerics(self, True)
        self.post_init()

    def _decode_step_eager(
        self, embeds: torch.Tensor, input_ids: torch.Tensor | None, cache: DeepseekV4StaticCache
    ) -> torch.Tensor:
        """One real token per row `[B, 1, d]` on a prefilled static cache -> final hidden `[B, 1, d]`; no value
        of any tensor is read into Python, so this compiles into one graph (`compile_decode`)."""
        b = embeds.shape[0]
        meta = BatchMeta(cache.seen, torch.ones_like(cache.seen), 1, self.rope_tables, static=True)
        hidden = embeds.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1)
        for i, layer in enumerate(self.layers):
            hidden, _ = layer(hidden, meta=meta, input_ids=input_ids, layer_cache=cache.layers[i])
        cache.seen.add_(torch.ones(b, dtype=cache.seen.dtype, device=cache.seen.device))
        return self.norm(self.hc_head(hidden))

    def _decode_step(self, embeds, input_ids, cache):
        step = self.__dict__.get("_compiled_decode_step")
        return (step or self._decode_step_eager)(embeds, input_ids, cache)

    def compile_decode(self, **compile_kwargs) -> None:
        """`torch.compile` the static-cache decode step (fullgraph: the step has no graph break)."""
        compile_kwargs.setdefault("fullgraph", True)
        self.__dict__["_compiled_decode_step"] = torch.compile(self._decode_step_eager, **compile_kwargs)

    def _resolve_cache(self, cache: Cache | None, use_cache: bool) -> DeepseekV4Cache | None:
        if isinstance(cache, DeepseekV4Cache):
            return cache
        if cache is not None and not (isinstance(cache, DynamicCache) and cache.get_seq_length() == 0):
            raise TypeError(
                f"DeepSeek-V4 needs a DeepseekV4Cache (it stores compressor state), got "
                f"{type(cache).__name__}; pass None and the model creates one."
            )
        # Checkpointed training recomputes layers, which must not update a cache twice; without gradients there
        # is no recompute (generating from a model left in training mode keeps its cache).
        if not use_cache or (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return None
        return DeepseekV4Cache(self.config)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_streams: bool = False,
        cache: Cache | None = None,
        **kwargs,
    ) -> DeepseekV4ModelOutput:
        """Positions come from each row's real tokens (attention_mask) and the cache; `position_ids` is accepted
        for API compatibility (`cumsum(attention_mask) - 1`, what `generate` passes) and read only to find packed
        documents: positions that restart inside a row, or `cu_seq_lens_q`, run each document as its own row
        (`packing.py`).
        The cache comes as `cache=` (transformers >= 5.24) or `past_key_values=` (its older name); the output
        carries it under both names (compat.py). `input_streams` `[B, S, n, d]` (internal, pipeline_support.py): a
        later pipeline stage starts from the previous stage's streams instead of the embeddings."""
        check_inputs(input_ids, inputs_embeds)
        input_streams = kwargs.pop("input_streams", None)
        spans = packed_spans(position_ids, attention_mask, kwargs)
        if spans is not None:  # several documents per row (TRL padding-free / packing): one row each, then back
            return forward_packed(
                self, spans, input_ids, inputs_embeds, pick_cache(cache, past_key_values), use_cache,
                output_hidden_states=output_hidden_states, output_router_logits=output_router_logits,
                return_streams=return_streams, **kwargs,
            )  # fmt: skip
        warn_ignored_requests(self.config, kwargs)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = bool(
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if inputs_embeds is None and input_streams is None:
            inputs_embeds = self.embed_tokens(input_ids)
        x = inputs_embeds if input_streams is None else input_streams
        b, s = x.shape[:2]
        cache = self._resolve_cache(pick_cache(cache, past_key_values), use_cache)
        if isinstance(cache, DeepseekV4StaticCache) and cache.ready and s == 1:
            hidden = self._decode_step(inputs_embeds, input_ids, cache)
            cache.processed += 1
            return DeepseekV4ModelOutput(last_hidden_state=hidden, **cache_kwargs(cache))
        valid = valid_tokens(attention_mask, b, s)
        if valid is None:
            order = None
            lengths = torch.full((b,), s, dtype=torch.long, device=x.device)
        else:
            # Stable sort puts each row's real tokens first, in order; pads go to the end.
            order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
            x, input_ids = rows_gather(x, order), rows_gather(input_ids, order)
            lengths = valid.sum(dim=1)
        start = cache.start_positions(b, x.device) if cache is not None else torch.zeros_like(lengths)
        meta = BatchMeta(start, lengths, s, self.rope_tables)

        inverse = None if order is None else torch.argsort(order, dim=1)
        restore = (lambda t: t) if inverse is None else (lambda t: rows_gather(t, inverse))
        hidden = x if input_streams is not None else x.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1)
        all_hidden, routers, indexer_losses = [], [], []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nn.Identity):  # another pipeline stage's layer (transformers' PipelineIdentityLayer)
                continue
            if output_hidden_states:
                all_hidden.append(restore(hidden))
                # Continue from the returned tensor (a permutation there and back, exact) so that it lies on the
                # graph of the outputs: `hidden_states[i].retain_grad()` then gets the outputs' gradient.
                hidden = hidden if order is None else rows_gather(all_hidden[-1], order)
            hidden, router = layer(
                hidden, meta=meta, input_ids=input_ids, layer_cache=cache.layers[i] if cache else None
            )
            routers.append(None if layer.mlp.is_hash else router)
            if len(router) > 2:
                indexer_losses.append(router[2])
        if cache is not None:
            cache.advance(lengths, s, valid)
            if isinstance(cache, DeepseekV4StaticCache) and not cache.ready:
                cache.freeze_shapes(self.config)
        streams = hidden
        # Before the last pipeline stage `hc_head` and `norm` are identities: the streams go out (pipeline_support.py).
        hidden = restore(self.norm(self.hc_head(hidden)))
        if output_hidden_states:
            all_hidden.append(hidden)

        router_logits = None
        if output_router_logits:
            router_logits = tuple(restore(r[0].view(b, s, -1)).reshape(b * s, -1) for r in routers if r is not None)
        return DeepseekV4ModelOutput(
            last_hidden_state=hidden,
            **cache_kwargs(cache),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            router_logits=router_logits,
            last_streams=restore(streams) if return_streams else None,
            indexer_loss=torch.stack(indexer_losses).mean() if indexer_losses else None,
        )


class DeepseekV4ExtForCausalLM(DeepseekV4GenerationHooks, DeepseekV4ExtPreTrainedModel, GenerationMixin):
    """Causal LM head on `DeepseekV4ExtModel`; fp32 logits, `num_items_in_batch`-aware loss, optional aux loss."""

    _tied_weights_keys = {}
    # transformers' distributed engine: the head's TP / PP / FSDP2 rules live on the LM class (parallel_plans.py)
    _tp_plan = CAUSAL_LM_TP_PLAN
    _pp_plan = CAUSAL_LM_PP_PLAN
    _fsdp_plan = CAUSAL_LM_FSDP_PLAN

    def __init__(self, config: DeepseekV4ExtConfig):
        super().__init__(config)
        self.model = DeepseekV4ExtModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_streams: bool | int = False,
        cache: Cache | None = None,
        **kwargs,
    ) -> DeepseekV4CausalLMOutput:
        """Standard causal-LM forward. `labels` are shifted inside the loss; `num_items_in_batch` (from Trainer
        with gradient accumulation) normalizes the summed token loss, and the router aux loss is scaled by this
        micro-batch's share of those tokens so accumulation matches one large batch. `return_streams` (MTP
        speculation): True puts the final streams `[B, S, n, d]` on the output as `last_streams`, an int n > 0
        only those of the last n positions."""
        if self.training and not self.__dict__.get("_lora_targets_checked") and not torch.compiler.is_compiling():
            self._lora_targets_checked = True  # once: LoRA layers are in place before the first training step
            warn_untrained_lora_targets(self)
        spans = packed_spans(position_ids, attention_mask, kwargs)
        if spans is not None and labels is not None:
            labels = mask_document_starts(labels, spans)  # never predict a document from the one before it
        output_router_logits = (
            self.config.output_router_logits if output_router_logits is None else output_router_logits
        )
        warn_ignored_requests(self.config, kwargs)
        train_mtp = labels is not None and self.config.mtp_loss_weight > 0 and len(self.model.mtp) > 0
        if train_mtp and spans is not None:  # the MTP head reads whole documents: run them as rows, repack
            if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
                raise ValueError("Packed sequences with mtp_loss_weight > 0 need every logit: keep logits_to_keep=0.")
            return forward_packed(
                self, spans, input_ids, inputs_embeds, pick_cache(cache, past_key_values), use_cache, labels=labels,
                output_hidden_states=output_hidden_states, output_router_logits=output_router_logits,
                return_streams=return_streams, **kwargs,
            )  # fmt: skip
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{key: kwargs[key] for key in PACKING_KWARGS if key in kwargs},
            cache=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            return_streams=bool(return_streams) or train_mtp,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        # fp32 logits like the reference (forward-math.md §10 row 10).
        logits = self.lm_head(hidden[:, keep].to(self.lm_head.weight.dtype)).float()

        loss, aux_loss = None, None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        if output_router_logits and outputs.router_logits:
            aux_loss = router_balance_loss(
                outputs.router_logits, self.config.num_experts_per_tok, attention_mask, logits.shape[0],
                per_sequence=self.config.seq_aux,
            )  # fmt: skip
            if loss is not None:
                share = 1.0
                num_items = kwargs.get("num_items_in_batch")
                if num_items is not None:
                    share = (labels[:, 1:] != -100).sum() / num_items
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device) * share
        mtp_loss = None
        if train_mtp:
            mtp_logits = self._mtp_head(outputs.last_streams, input_ids, inputs_embeds, attention_mask)
            # position t predicts token t + 2: labels shifted once here, once more inside the loss
            mtp_loss = self.loss_function(mtp_logits, labels[:, 1:], self.vocab_size, **kwargs)
            loss = loss + self.config.mtp_loss_weight * mtp_loss.to(loss.device)
        if loss is not None and outputs.indexer_loss is not None:
            loss = loss + self.config.indexer_loss_weight * outputs.indexer_loss.to(loss.device)
        streams = outputs.last_streams if return_streams else None
        if streams is not None and not isinstance(return_streams, bool):
            streams = streams[:, -int(return_streams) :]
        return DeepseekV4CausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **cache_kwargs(outputs.cache),
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits,
            last_streams=streams,
            mtp_loss=mtp_loss,
            indexer_loss=outputs.indexer_loss,
        )

    def _mtp_head(self, streams, input_ids, inputs_embeds, attention_mask, depth: int = 0) -> torch.Tensor:
        """Logits `[B, S - 1, V]` of MTP block `depth` over the main streams `[B, S, n, d]`: position t from the
        streams at t and the embedding of token t + 1. Rows may be right-padded (pads come after every real token,
        so the causal block never reads them; their labels are -100)."""
        if attention_mask is not None:
            mask = attention_mask.bool()
            if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
                raise ValueError(
                    "mtp_loss_weight > 0 needs right-padded (or unpadded) rows: a real token after a pad would let "
                    "the MTP block attend to padding. Use padding_side='right' for training."
                )
        embeds = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        next_ids = input_ids[:, 1:] if input_ids is not None else None
        b, s = streams.shape[:2]
        lengths = torch.full((b,), s - 1, dtype=torch.long, device=streams.device)
        meta = BatchMeta(torch.zeros_like(lengths), lengths, s - 1, self.model.rope_tables)
        hidden, _ = self.model.mtp[depth](streams[:, :-1], embeds[:, 1:], meta, next_ids)
        return self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()

    def mtp_logits(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, depth: int = 0
    ) -> torch.Tensor:
        """Logits `[B, S - 1, V]` of MTP block `depth` (no cache): position t predicts token t + 2 from the main
        streams at t and the embedding of token t + 1 (DeepSeek-V3 convention, forward-math.md §7)."""
        if depth >= len(self.model.mtp):
            raise ValueError(f"This model has {len(self.model.mtp)} MTP blocks; depth {depth} does not exist.")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("mtp_logits supports unpadded batches only; drop the padding or run rows one by one.")
        out = self.model(input_ids=input_ids, use_cache=False, return_streams=True, return_dict=True)
        return self._mtp_head(out.last_streams, input_ids, None, None, depth)


__all__ = ["DeepseekV4ExtPreTrainedModel", "DeepseekV4ExtModel", "DeepseekV4ExtForCausalLM", "DeepseekV4Cache"]
