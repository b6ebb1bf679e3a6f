"""Packed (padding-free) batches for training: several documents in one row, marked by `position_ids` that restart
or by flash-attention's `cu_seq_lens_q` (what TRL's `padding_free` / `packing` collators send).

This model derives positions, sliding windows, compression windows and the indexer from each row's real tokens, so
a packed row is *unpacked*: every document becomes its own right-padded row, the model runs on that batch exactly
as it runs on documents passed one per row, and the logits (hidden states, streams) are put back at the packed
positions. Each document therefore gets the same logits and loss as alone; predictions across a document boundary
are never made (the first token of a document has no prediction, as in the unpacked batch).
"""

from __future__ import annotations

import torch

# the flash-attention varlen arguments TRL's padding-free collator sends next to (or instead of) position_ids
PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_spans(
    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, kwargs: dict
) -> list[tuple[int, int, int]] | None:
    """The documents of a packed batch as (row, start, end), or None when the batch is not packed.

    Packed: `cu_seq_lens_q` (one row; document boundaries), or `position_ids` `[B, S]` that do not increase somewhere
    inside a row with no padding (generate's cumsum-of-mask positions on padded rows are not packing)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        cu = kwargs.get("cu_seq_lens_k")
    if cu is not None:
        bounds = [int(v) for v in cu.reshape(-1).tolist()]
        return [(0, a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if position_ids is None or position_ids.shape[-1] < 2:
        return None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        return None
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    restart = pos[:, 1:] <= pos[:, :-1]
    if not bool(restart.any()):
        return None
    spans = []
    for row in range(pos.shape[0]):
        cuts = [0] + (torch.nonzero(restart[row]).flatten() + 1).tolist() + [pos.shape[1]]
        spans += [(row, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    return spans


def unpack(x: torch.Tensor | None, spans: list[tuple[int, int, int]], pad) -> torch.Tensor | None:
    """`[B, S, ...]` -> `[N documents, longest, ...]`, each document left-aligned, the rest filled with `pad`."""
    if x is None:
        return None
    longest = max(end - start for _, start, end in spans)
    out = x.new_full((len(spans), longest, *x.shape[2:]), pad)
    for i, (row, start, end) in enumerate(spans):
        out[i, : end - start] = x[row, start:end]
    return out


def repack(x: torch.Tensor | None, spans: list[tuple[int, int, int]], batch: int, length: int) -> torch.Tensor | None:
    """Inverse of `unpack` for per-token outputs `[N, longest, ...]` -> `[B, S, ...]` (differentiable)."""
    if x is None:
        return None
    rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    for i, (row, start, end) in enumerate(spans):
        rows[row].append((start, x[i, : end - start]))
    out = []
    for parts in rows:
        parts.sort(key=lambda p: p[0])
        out.append(torch.cat([p for _, p in parts], dim=0))
    stacked = torch.stack(out)
    if stacked.shape[1] != length:
        raise ValueError(
            f"packed documents cover {stacked.shape[1]} of {length} positions: pass every token in a span"
        )
    return stacked


def mask_document_starts(labels: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """labels `[B, S]` with the first token of every document set to -100 (a copy): the causal-LM loss shift
    would otherwise predict it from the previous document's last token."""
    labels = labels.clone()
    for row, start, _ in spans:
        labels[row, start] = -100
    return labels


def forward_packed(model, spans, input_ids, inputs_embeds, cache, use_cache, labels=None, **kwargs):
    """`forward` of a packed batch (`DeepseekV4ExtModel`, or the causal LM when it needs whole documents, as the MTP
    loss does): each document as its own right-padded row (`labels` padded with -100), then every per-token output
    (`last_hidden_state` / `logits`, `hidden_states`, `last_streams`, `router_logits`) back at its packed
    position. Training forwards only (no cache)."""
    if cache is not None or use_cache:
        raise ValueError(
            "Packed sequences (position_ids restarting inside a row, cu_seq_lens_*) are for training forwards: "
            "pass use_cache=False and no past_key_values, or generate from one document per row."
        )
    for key in PACKING_KWARGS:
        kwargs.pop(key, None)
    ref = input_ids if input_ids is not None else inputs_embeds
    b, s = ref.shape[:2]
    mask = unpack(torch.ones(b, s, dtype=torch.long, device=ref.device), spans, 0)
    if labels is not None:
        kwargs["labels"] = unpack(labels, spans, -100)
    out = model(
        input_ids=unpack(input_ids, spans, 0),
        attention_mask=mask,
        inputs_embeds=unpack(inputs_embeds, spans, 0.0),
        use_cache=False,
        return_dict=True,
        **kwargs,
    )
    n, longest = mask.shape
    for name in ("last_hidden_state", "logits"):
        if getattr(out, name, None) is not None:
            setattr(out, name, repack(getattr(out, name), spans, b, s))
    if out.hidden_states is not None:
        out.hidden_states = tuple(repack(h, spans, b, s) for h in out.hidden_states)
    out.last_streams = repack(out.last_streams, spans, b, s)
    if out.router_logits:
        out.router_logits = tuple(
            repack(r.view(n, longest, -1), spans, b, s).reshape(b * s, -1) for r in out.router_logits
        )
    return out
