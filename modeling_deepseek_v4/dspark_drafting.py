"""DSpark speculative decoding with the drafter of `DeepSeek-V4-Flash-0731` / `-DSpark` (docs/dspark.md §2.4-2.5).

Use: `model.generate(ids, use_dspark=True)` (or `GenerationConfig(use_dspark=True)`). Greedy output is token-identical
to plain greedy decoding; with `do_sample=True` the drafts are sampled from the Markov-corrected draft distribution
and verified by transformers' speculative sampling (accept with min(1, p_t / p_d), resample from the residual on the
first rejection, a bonus token after a fully accepted block: DeepSpec's lossless verifier), so the target's
distribution is kept. `dspark_confidence_threshold` (0..1) cuts each draft at the first position whose confidence
`sigmoid(c_i)` is below it. After `generate`, `model.last_dspark_stats` (an `MTPStats`) holds drafted / accepted
counts and verification steps. Batch size 1, unpadded (transformers' assisted-decoding loop is single-sequence).

One round, with p the last position the target has processed and `anchor` the token it produced for p + 1:
1. Tap: the target's forward leaves `mean over hc streams` of the outputs of `dspark_target_layer_ids`
   (`[1, n, k d]`, forward hooks installed for the call, `capture_taps`) for its newly committed positions.
2. Context: `main_x = main_norm(main_proj(taps))`; each stage writes `rope(kv_norm(kv_proj(main_x)), pos)` into its
   ring of `sliding_window` slots at `pos % window` for every committed position (`DSparkRing`). Only committed
   positions are ever written, so a rejected draft leaves nothing to roll back.
3. Block: `[anchor, noise x (W - 1)]` at positions p + 1 .. p + W goes through the stages (mHC, DSpark attention
   over the ring and the whole block: bidirectional, with the per-head sink; MoE), then `hc_head`, `norm` and the
   shared LM head: W rows of logits.
4. Markov loop: row i gets `markov_w2 . markov_w1[prev]` added, its token is picked (argmax or sampled), `prev` is
   that token; row i drafts position p + 2 + i. Confidence: `proj(cat(y_i, markov_w1[prev_i]))`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .mtp_speculation import OwnDrafterCandidateGenerator, refuse_other_drafters
from .ops import rms_norm
from .reference_numerics import kv_fp8_roundtrip
from .rope import apply_rope


class DSparkRing:
    """Per stage, the context keys `[B, window, D]` of the last `window` committed positions (slot `pos % window`)
    and the position each slot holds (`-1`: empty)."""

    def __init__(self, num_stages: int, window: int):
        self.window = window
        self.keys: list[torch.Tensor | None] = [None] * num_stages
        self.positions: torch.Tensor | None = None

    def write(self, stage_keys: list[torch.Tensor], positions: torch.Tensor) -> None:
        """stage_keys: per stage `[B, n, D]` for the committed `positions` `[n]` (increasing)."""
        if positions.numel() > self.window:  # older positions would be overwritten in this very write
            stage_keys, positions = [k[:, -self.window :] for k in stage_keys], positions[-self.window :]
        slots = positions % self.window
        if self.positions is None:
            self.positions = torch.full((self.window,), -1, dtype=torch.long, device=positions.device)
        self.positions[slots] = positions
        for s, new in enumerate(stage_keys):
            if self.keys[s] is None:
                self.keys[s] = new.new_zeros(new.shape[0], self.window, new.shape[-1])
            self.keys[s][:, slots] = new

    def valid(self, stage: int) -> torch.Tensor:
        """The filled slots' keys `[B, n_valid, D]` (their order does not matter to attention)."""
        return self.keys[stage][:, self.positions >= 0]


def dspark_attention(attn, x: torch.Tensor, ring_keys: torch.Tensor, cos, sin) -> torch.Tensor:
    """DSpark attention of one stage (dspark.md §2.4 step 5): x `[B, W, d]` (the normed block), ring_keys
    `[B, n, D]` -> `[B, W, d]`. Every block row attends to the ring and to every block row (no causal mask), with the
    per-head sink in the softmax denominator; the block's own keys are never stored."""
    b, w, _ = x.shape
    q = attn.q_b_proj(attn.q_a_norm(attn.q_a_proj(x))).view(b, w, -1, attn.head_dim)
    q = apply_rope(rms_norm(q, None, attn.eps), cos, sin)
    kv = apply_rope(attn.kv_norm(attn.kv_proj(x)), cos, sin)
    if attn.reference_numerics:
        kv = kv_fp8_roundtrip(kv, attn.rope_dim)
    keys = torch.cat([ring_keys.to(kv.dtype), kv], dim=1).float()
    scores = torch.einsum("bqhd,bkd->bhqk", q.float(), keys) * attn.scaling
    sink = attn.sinks.float().view(1, -1, 1, 1).expand(b, -1, w, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("bhqk,bkd->bqhd", probs, keys).to(x.dtype)
    out = apply_rope(out, cos, sin, inverse=True)
    return attn.o_b_proj(attn.o_a_proj(out.reshape(b, w, -1, attn.num_heads * attn.head_dim // attn.o_groups)))


@contextlib.contextmanager
def loaded(module: torch.nn.Module) -> Iterator[torch.device]:
    """Inside, every tensor of `module` is on its execution device; yields that device. The drafting calls a stage's
    submodules one by one, not the stage's `forward`, so accelerate's offload hooks (`device_map` with "disk" / "cpu"
    offload, `cpu_offload`: `_hf_hook` on a block or on each module) are run here around the whole use instead."""
    hooked = [m for m in module.modules() if getattr(m, "_hf_hook", None) is not None]
    for m in hooked:
        m._hf_hook.pre_forward(m)
    try:
        yield next(t.device for t in module.parameters())
    finally:
        for m in hooked:
            m._hf_hook.post_forward(m, None)


def context_keys(drafter, taps: torch.Tensor, cos, sin) -> list[torch.Tensor]:
    """taps `[B, n, k d]` (hc-averaged outputs of the target layers) -> per stage the ring keys `[B, n, D]`."""
    main_x = drafter.main_norm(drafter.main_proj(taps.to(drafter.main_norm.weight.dtype)))
    keys = []
    for layer in drafter.layers:
        with loaded(layer) as device:
            attn = layer.self_attn
            x = main_x.to(device, attn.kv_norm.weight.dtype)
            kv = apply_rope(attn.kv_norm(attn.kv_proj(x)), cos.to(device), sin.to(device))
            keys.append(kv_fp8_roundtrip(kv, attn.rope_dim) if attn.reference_numerics else kv)
    return keys


def draft_block(
    drafter,
    embeds: torch.Tensor,
    ring: DSparkRing,
    cos,
    sin,
    anchor: torch.Tensor,
    lm_head: torch.nn.Module,
    pick: Callable[[torch.Tensor, int], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One draft block. embeds `[B, W, d]` (anchor then noise), cos/sin of positions p + 1 .. p + W, anchor `[B]`;
    `pick(logits [B, V], i)` -> token `[B]` (and may process the logits it is given in place of a copy).
    Returns (tokens `[B, W]`, Markov-corrected logits as picked from `[B, W, V]` fp32, confidence logits `[B, W]`)."""
    x = embeds.unsqueeze(2).expand(-1, -1, drafter.hc_head.hc_mult, -1)
    for s, layer in enumerate(drafter.layers):
        with loaded(layer) as device:
            x, stage_cos, stage_sin = x.to(device), cos.to(device), sin.to(device)
            collapsed, post, comb = layer.attn_hc(x)
            normed = layer.input_layernorm(collapsed)
            attn_out = dspark_attention(layer.self_attn, normed, ring.valid(s).to(device), stage_cos, stage_sin)
            x = layer.attn_hc.expand(attn_out, x, post, comb)
            collapsed, post, comb = layer.ffn_hc(x)
            mlp_out, _ = layer.mlp(layer.post_attention_layernorm(collapsed))
            x = layer.ffn_hc.expand(mlp_out, x, post, comb)
    y = drafter.hc_head(x)  # [B, W, d], pre-norm: what the confidence head reads
    logits = lm_head(drafter.norm(y).to(lm_head.weight.dtype)).float()
    tokens, picked, confidence, prev = [], [], [], anchor
    for i in range(logits.shape[1]):
        bias, e = drafter.markov_head(prev)
        row = logits[:, i] + bias
        confidence.append(drafter.confidence_head(y[:, i], e))
        prev = pick(row, i)
        tokens.append(prev)
        picked.append(row)
    return torch.stack(tokens, 1), torch.stack(picked, 1), torch.stack(confidence, 1)


@contextlib.contextmanager
def capture_taps(model) -> Iterator[dict[int, torch.Tensor]]:
    """While active, each forward of a target layer leaves the hc-average of its output streams, last `window`
    positions `[B, n, d]`, in the yielded dict under the layer index (forward hooks, removed on exit)."""
    taps: dict[int, torch.Tensor] = {}
    window = model.config.sliding_window

    def hook(index: int):
        def store(module, args, output):
            taps[index] = output[0][:, -window:].detach().mean(dim=2)

        return store

    handles = [model.model.layers[i].register_forward_hook(hook(i)) for i in model.config.dspark_target_layer_ids]
    try:
        yield taps
    finally:
        for handle in handles:
            handle.remove()


def build_dspark_candidate_generator(
    model,
    generation_config,
    input_ids: torch.LongTensor,
    inputs_tensor: torch.Tensor | None,
    logits_processor,
    model_kwargs: dict,
    assistant_model=None,
    target_tokenizer=None,
    assistant_tokenizer=None,
) -> DeepseekV4DSparkCandidateGenerator:
    """What `_get_candidate_generator` calls when `generate(use_dspark=True)` set `generation_config.use_dspark`; the
    taps come from the hooks `generate` installed (`capture_taps`, `model._dspark_taps`)."""
    refuse_other_drafters(generation_config, assistant_model, "use_dspark", "DSpark drafter")
    return DeepseekV4DSparkCandidateGenerator(
        model, generation_config, input_ids, logits_processor, model_kwargs, model._dspark_taps
    )


class DeepseekV4DSparkCandidateGenerator(OwnDrafterCandidateGenerator):
    """Drafts a block of `dspark_block_size` tokens per step with `model.model.dspark` (batch size 1)."""

    def __init__(self, model, generation_config, input_ids, logits_processor, model_kwargs, taps: dict):
        drafter = model.model.dspark
        if drafter is None:
            raise ValueError("use_dspark=True needs a DSpark drafter (a -0731 / -DSpark checkpoint); none here.")
        super().__init__("use_dspark", generation_config, input_ids, logits_processor, model_kwargs)
        threshold = getattr(generation_config, "dspark_confidence_threshold", None)
        if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"dspark_confidence_threshold must lie in [0, 1], got {threshold}.")
        self.model, self.drafter, self.taps, self.threshold = model, drafter, taps, threshold
        self.model_kwargs_overrides = {}  # the taps come through forward hooks (`capture_taps`), not the outputs
        config = model.config
        self.block, self.noise = config.dspark_block_size, config.dspark_noise_token_id
        self.ring = DSparkRing(len(drafter.layers), config.sliding_window)
        model.last_dspark_stats = self.stats

    def _cos_sin(self, positions: torch.Tensor):
        cos, sin = self.model.model.rope_tables.cos_sin("main", positions)
        return cos.unsqueeze(0), sin.unsqueeze(0)

    @torch.no_grad()
    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict | None = None,
        model_outputs=None,
        is_first_iteration: bool = False,
        n_last_matches: int = 0,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """input_ids `[1, L]` (the anchor, last, not yet seen by the target) -> (`[1, L + k]`, logits `[1, k, V]`).
        The first call returns no candidates: the target prefills the prompt, leaving its taps."""
        self.last_drafted = 0
        if is_first_iteration:
            return input_ids, None
        ids = self.model.config.dspark_target_layer_ids
        if any(i not in self.taps for i in ids):
            raise ValueError("DSpark drafting needs the target layers' taps (generate(use_dspark=True) sets them).")
        taps = torch.cat([self.taps[i] for i in ids], dim=-1)
        p = input_ids.shape[1] - 2  # last position the target has processed; the anchor is at p + 1
        n_new = min(taps.shape[1], int(n_last_matches) + 1) if self.prefilled else taps.shape[1]
        self.prefilled = True
        device = input_ids.device  # the ring and positions; each stage moves what it reads to its own device
        positions = torch.arange(p - n_new + 1, p + 1, device=device)
        self.ring.write(context_keys(self.drafter, taps[:, :n_new].to(device), *self._cos_sin(positions)), positions)

        k = min(self.block, self.max_length - input_ids.shape[1] - 1)
        if k <= 0:
            return input_ids, None
        anchor = input_ids[:, -1].to(device)
        block_ids = torch.full((1, self.block), self.noise, dtype=torch.long, device=device)
        block_ids[:, 0] = anchor
        embeds = self.model.model.embed_tokens(block_ids)
        cos, sin = self._cos_sin(torch.arange(p + 1, p + 1 + self.block, device=device))
        context = input_ids

        def pick(row: torch.Tensor, i: int) -> torch.Tensor:
            nonlocal context
            token, processed = self._pick(row, context)
            row.copy_(processed)  # the verifier compares against the processed draft logits
            context = torch.cat([context, token.to(context.device)], dim=1)
            return token[:, 0]

        tokens, logits, confidence = draft_block(
            self.drafter, embeds, self.ring, cos, sin, anchor, self.model.lm_head, pick
        )
        if self.threshold is not None:
            keep = torch.sigmoid(confidence[0, :k]) >= float(self.threshold)
            k = int(keep.long().cumprod(0).sum())
            if k == 0:
                return input_ids, None
        self.last_drafted = k
        candidates = torch.cat([input_ids, tokens[:, :k].to(input_ids.device)], dim=1)
        return candidates, logits[:, :k].to(input_ids.device)


__all__ = [
    "DSparkRing",
    "DeepseekV4DSparkCandidateGenerator",
    "build_dspark_candidate_generator",
    "capture_taps",
    "context_keys",
    "draft_block",
    "dspark_attention",
]
