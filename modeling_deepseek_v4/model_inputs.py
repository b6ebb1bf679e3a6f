"""What the model does with its inputs before the layers run: checks (empty inputs, `input_ids` next to
`inputs_embeds`, requests it cannot honour) and the row compaction of padded batches (each row's real
tokens first, from a 0/1 or additive attention mask; `rows_gather` moves rows there and back). Used by
`DeepseekV4ExtModel.forward` and `DeepseekV4ExtForCausalLM.forward` (docs/hf-integration.md §6.4).
"""

from __future__ import annotations

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


def warn_ignored_requests(config, kwargs: dict) -> None:
    """Warn once about requests this model cannot honour, instead of ignoring them silently."""
    if kwargs.get("output_attentions"):
        logger.warning_once(
            "DeepSeek-V4 does not return attention weights (its attention runs in query chunks over a key band and "
            "never forms them); `output_attentions=True` is ignored and `attentions` stays None."
        )
    if config.attention_dropout:
        logger.warning_once(
            f"attention_dropout={config.attention_dropout} is not applied: DeepSeek-V4 (like the official model) "
            "has no attention dropout."
        )


def valid_tokens(attention_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """`[B, S]` bool of real tokens in this call from a 2-D mask over (past +) current tokens, None if all real."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < seq_len:
        raise ValueError(
            f"DeepSeek-V4 takes a 2-D attention_mask [batch, past + new tokens] of 0/1 (got shape "
            f"{tuple(attention_mask.shape)} for {batch} x {seq_len} new tokens); causality, the sliding window "
            "and compression are handled inside the model."
        )
    mask = attention_mask[:, -seq_len:]
    if mask.is_floating_point() and bool((mask < 0).any()):
        # An additive mask (0 = attend, a large negative or -inf = masked), as some pipelines build them.
        if not bool(((mask == 0) | (mask <= -1e4)).all()):
            raise ValueError(
                "attention_mask has negative values that are not an additive mask's (0 for real tokens, <= -1e4 or "
                "-inf for padding); pass a 0/1 mask [batch, past + new tokens]."
            )
        valid = mask == 0
    else:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                "attention_mask must hold 0 (padding) and 1 (real token) only, or be an additive 0 / -inf mask."
            )
        valid = mask.bool()
    return None if bool(valid.all()) else valid


def check_inputs(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
    """`input_ids [B, S]` and / or `inputs_embeds [B, S, d]` (both: the embeddings are used, the ids feed the
    hash-routed layers, which pick experts by token id), with at least one token per row."""
    if input_ids is None and inputs_embeds is None:
        raise ValueError("Pass `input_ids` [batch, tokens] or `inputs_embeds` [batch, tokens, hidden].")
    if input_ids is not None and inputs_embeds is not None and input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} disagree: with both, "
            "input_ids must name the tokens of inputs_embeds (the hash-routed layers read them)."
        )
    shape = tuple(input_ids.shape if input_ids is not None else inputs_embeds.shape[:2])
    if 0 in shape:
        raise ValueError(f"The input is empty (batch x tokens = {shape}); pass at least one token per row.")


def rows_gather(x: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor | None:
    """Reorder dim 1 of `x [B, S, ...]` per row with `order [B, S]`."""
    if x is None:
        return None
    # A model split across devices (accelerate `device_map`) ends on another device than the embedding it started on.
    order = order.to(x.device)
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)
