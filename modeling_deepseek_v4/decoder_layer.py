"""The decoder block and the MTP block (tech report §2.1-2.2; official `inference/model.py`, `Block` / `MTPBlock`):
attention and MoE sub-layers, each inside its own mHC hyper-connection."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import DeepseekV4Attention
from .batch_meta import BatchMeta
from .cache import DeepseekV4LayerCache
from .configuration_deepseek_v4 import DeepseekV4ExtConfig
from .hyper_connection import DeepseekV4HyperConnection, DeepseekV4HyperHead
from .moe import DeepseekV4SparseMoeBlock
from .norm import DeepseekV4RMSNorm


class DeepseekV4DecoderLayer(GradientCheckpointingLayer):
    """Attention and MoE sub-layers, each wrapped in its own mHC (`attn_hc`, `ffn_hc`). Streams `[B, S, n, d]`."""

    def __init__(self, config: DeepseekV4ExtConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = DeepseekV4Attention(config, layer_idx)
        self.mlp = DeepseekV4SparseMoeBlock(config, layer_idx)
        self.input_layernorm = DeepseekV4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn_hc = DeepseekV4HyperConnection(config)
        self.ffn_hc = DeepseekV4HyperConnection(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        meta: BatchMeta | None = None,
        input_ids: torch.Tensor | None = None,
        layer_cache: DeepseekV4LayerCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        collapsed, post, comb = self.attn_hc(hidden_states)
        attn_out = self.self_attn(self.input_layernorm(collapsed), meta, layer_cache)
        hidden_states = self.attn_hc.expand(attn_out, hidden_states, post, comb)
        collapsed, post, comb = self.ffn_hc(hidden_states)
        static = meta is not None and meta.static
        mlp_out, router = self.mlp(self.post_attention_layernorm(collapsed), input_ids, static)
        if self.self_attn.indexer_kl is not None:  # returned, not only stored: checkpointed layers recompute it
            router = (*router, self.self_attn.indexer_kl)
        return self.ffn_hc.expand(mlp_out, hidden_states, post, comb), router


class DeepseekV4MTPLayer(DeepseekV4DecoderLayer):
    """Multi-token-prediction block (`mtp.0.*`, forward-math.md §7): a decoder layer (index n_layers, sliding only,
    score-routed) fed `e_proj(enorm(embed(next ids))) + h_proj(hnorm(main streams))`, with its own `hc_head` and
    `norm`; embedding and LM head are shared with the main model."""

    def __init__(self, config: DeepseekV4ExtConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        d = config.hidden_size
        self.enorm = DeepseekV4RMSNorm(d, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV4RMSNorm(d, eps=config.rms_norm_eps)
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.norm = DeepseekV4RMSNorm(d, eps=config.rms_norm_eps)
        self.hc_head = DeepseekV4HyperHead(config)

    def forward(
        self,
        streams: torch.Tensor,
        next_embeds: torch.Tensor,
        meta: BatchMeta,
        next_ids: torch.Tensor | None = None,
        layer_cache: DeepseekV4LayerCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """streams `[B, S, n, d]` (main model, before `hc_head`), next_embeds `[B, S, d]` -> (hidden `[B, S, d]`,
        streams `[B, S, n, d]`). `layer_cache`: the block's own window cache (MTP speculation).

        The whole block is this `forward`, not a method around the decoder layer's: hooks that wrap a block's
        `forward` (accelerate's offload and device placement, FSDP units) then cover its norms and projections too.
        """
        x = self.h_proj(self.hnorm(streams)) + self.e_proj(self.enorm(next_embeds)).unsqueeze(2)
        x, _ = super().forward(x, meta=meta, input_ids=next_ids, layer_cache=layer_cache)
        return self.norm(self.hc_head(x)), x
