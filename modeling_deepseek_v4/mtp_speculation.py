"""MTP self-speculative decoding: the model's own MTP block (`mtp.0`) drafts, the main model verifies.

Use: `model.generate(ids, use_mtp=True)` (transformers 5.23's `GenerationConfig.use_mtp`, which selects assisted
decoding). Greedy output is token-identical to plain greedy decoding; with `do_sample=True` the drafts are sampled
and verified by speculative sampling (Leviathan et al., algorithm 1), which keeps the main model's distribution but
not plain sampling's exact token stream. After `generate`, `model.last_mtp_stats` (an `MTPStats`) holds
`num_drafted`, `num_accepted`, `num_steps`, `acceptance_rate` and `tokens_per_step`. Batch size 1 and unpadded
inputs only (transformers' assisted loop is single-sequence); other cases raise a ValueError.

transformers' own `MTPCandidateGenerator` does not fit: it rebuilds MTP layers from the main model's last decoder
layer and a `DynamicCache`, while DeepSeek-V4's block needs mHC streams and its own `hc_head` (forward-math.md §7;
tech report §2, MTP as in DeepSeek-V3). `DeepseekV4ExtForCausalLM._get_candidate_generator` returns
`DeepseekV4MTPCandidateGenerator` instead; the verification forward returns the main model's final streams
(`forward(return_streams=n)`, before `hc_head`) through `model_kwargs_overrides`.

Alignment (forward-math.md §7): MTP position t takes `h_proj(hnorm(streams_t)) + e_proj(enorm(embed(token_{t+1})))`
and predicts token t + 2. When the main model has consumed tokens `0..N-1` and picked token N, the block runs on
the newly verified positions up to N - 1 and its logits at N - 1 are the first draft (token N + 1). Those inputs
are all verified, so the block's own cache (`DeepseekV4Cache(num_layers=1)`, window KV only: compress ratio 0)
never holds a rejected token. Drafts 2..k (generation config entry `mtp_num_drafts`, default 1) reuse the block on
its own output streams in place of the main streams (DeepSeek-V3 / EAGLE style); those speculative positions are
rolled back with `crop` before the next step. The block is sliding-window only, so after the prompt it needs just
the last `sliding_window` positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.candidate_generator import CandidateGenerator

from .batch_meta import BatchMeta
from .cache import DeepseekV4Cache


@dataclass
class MTPStats:
    """Draft bookkeeping of one `generate(..., use_mtp=True)` call, stored as `model.last_mtp_stats`.

    num_drafted: draft tokens proposed; num_accepted: drafts the main model kept (a draft cut by `max_length` or
    EOS counts as rejected); num_steps: verification forwards after the prompt.
    """

    num_drafted: int = 0
    num_accepted: int = 0
    num_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        """num_accepted / num_drafted in [0, 1] (0.0 when nothing was drafted)."""
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens gained per verification forward (1 + accepted drafts per step)."""
        return (self.num_steps + self.num_accepted) / self.num_steps if self.num_steps else 0.0


def refuse_other_drafters(generation_config, assistant_model, flag: str, drafter: str) -> None:
    """The model's own drafter drafts alone: an assistant model, prompt lookup or early exit would go unused."""
    if assistant_model is not None or generation_config.prompt_lookup_num_tokens is not None:
        raise ValueError(f"{flag}=True drafts with the model's own {drafter}; drop assistant_model / prompt lookup.")
    if generation_config.assistant_early_exit is not None:
        raise ValueError(f"{flag}=True cannot be combined with assistant_early_exit.")


def build_mtp_candidate_generator(
    model,
    generation_config,
    input_ids: torch.LongTensor,
    inputs_tensor: torch.Tensor | None,
    logits_processor,
    model_kwargs: dict,
    assistant_model=None,
    target_tokenizer=None,
    assistant_tokenizer=None,
) -> DeepseekV4MTPCandidateGenerator:
    """What `DeepseekV4ExtForCausalLM._get_candidate_generator` calls when `generation_config.use_mtp` is set.

    Drafts per step: the generation config's custom entry `mtp_num_drafts` (default 1, the depth the block was
    trained for), set with `model.generation_config.mtp_num_drafts = k` or
    `generate(ids, generation_config=GenerationConfig(use_mtp=True, mtp_num_drafts=k))`; a plain
    `generate(..., mtp_num_drafts=k)` keyword is rejected by transformers' model-kwargs validation.
    """
    refuse_other_drafters(generation_config, assistant_model, "use_mtp", "MTP block")
    num_drafts = getattr(generation_config, "mtp_num_drafts", None) or 1
    return DeepseekV4MTPCandidateGenerator(
        model, generation_config, input_ids, logits_processor, model_kwargs, num_drafts
    )


class OwnDrafterCandidateGenerator(CandidateGenerator):
    """What the model's own drafters (the MTP block here, the DSpark drafter in dspark_drafting.py) share: batch size
    1 and unpadded inputs, the draft pick (logits processors, then argmax or a sample) and the acceptance counts."""

    requires_model_outputs = True

    def __init__(self, flag: str, generation_config, input_ids, logits_processor, model_kwargs):
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"{flag}=True supports batch size 1 only (transformers' assisted-decoding loop is single-sequence); "
                f"got batch size {input_ids.shape[0]}. Generate the rows one by one, or drop {flag}."
            )
        mask = model_kwargs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError(f"{flag}=True does not support padded inputs; pass the unpadded sequence.")
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.max_length = generation_config.max_length
        self.prefilled = False
        self.last_drafted = 0
        self.stats = MTPStats()

    def _pick(self, logits: torch.Tensor, context: torch.LongTensor) -> tuple[torch.LongTensor, torch.Tensor]:
        """Processed draft logits `[1, V]` and the draft token `[1, 1]` (argmax, or sampled when sampling)."""
        if self.logits_processor is not None and len(self.logits_processor) > 0:
            logits = self.logits_processor(context, logits)
        if self.do_sample:
            return torch.multinomial(logits.softmax(dim=-1), num_samples=1), logits
        return logits.argmax(dim=-1, keepdim=True), logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        """Count drafted / accepted tokens into the stats (called after each verification)."""
        if self.prefilled:
            self.stats.num_steps += 1
            self.stats.num_drafted += self.last_drafted
            self.stats.num_accepted += min(int(num_matches), self.last_drafted)


class DeepseekV4MTPCandidateGenerator(OwnDrafterCandidateGenerator):
    """Drafts `num_drafts` tokens per step with `model.model.mtp[0]` and its own window cache (batch size 1)."""

    def __init__(self, model, generation_config, input_ids, logits_processor, model_kwargs, num_drafts: int = 1):
        if len(model.model.mtp) == 0:
            raise ValueError("use_mtp=True needs an MTP block (config.num_nextn_predict_layers >= 1); none here.")
        super().__init__("use_mtp", generation_config, input_ids, logits_processor, model_kwargs)
        if int(num_drafts) < 1:
            raise ValueError(f"mtp_num_drafts must be >= 1, got {num_drafts}.")
        self.model = model
        self.block = model.model.mtp[0]
        self.num_drafts = int(num_drafts)
        self.window = model.config.sliding_window
        # Ask the verification forward for the final streams of its last positions: the whole call (k + 1 <= the
        # window) during decoding, the last `window` prompt positions at prefill (all the block can attend to).
        self.model_kwargs_overrides = {"return_streams": max(self.window, self.num_drafts + 1)}
        # Drafts 2..k are speculative positions of the block's own cache, undone before the next step.
        self.cache = DeepseekV4Cache(num_layers=1, rollback_tokens=self.num_drafts)
        self.pending = 0  # speculative MTP positions (drafts 2..k) to roll back before the next step
        model.last_mtp_stats = self.stats

    def _run_block(self, streams: torch.Tensor, ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the block on the next `S` MTP positions and advance its cache.

        streams `[1, S, n, d]` (main streams, or the block's own output for a speculative draft), ids `[1, S]` the
        tokens one position ahead -> (logits of the last position `[1, V]` fp32, output streams `[1, 1, n, d]`).
        """
        s = ids.shape[1]
        lengths = torch.full((1,), s, dtype=torch.long, device=ids.device)
        meta = BatchMeta(self.cache.start_positions(1, ids.device), lengths, s, self.model.model.rope_tables)
        embeds = self.model.model.embed_tokens(ids)
        hidden, out_streams = self.block(streams, embeds, meta, ids, layer_cache=self.cache.layers[0])
        self.cache.advance(lengths, s)
        head = self.model.lm_head
        return head(hidden[:, -1].to(head.weight.dtype)).float(), out_streams[:, -1:]

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
        """input_ids `[1, L]` (the last token not yet seen by the main model) -> (`[1, L + k]`, logits `[1, k, V]`).

        The first call returns no candidates, so the main model prefills the prompt and returns its streams.
        """
        self.last_drafted = 0
        if is_first_iteration:
            return input_ids, None
        if model_outputs is None or getattr(model_outputs, "last_streams", None) is None:
            raise ValueError("MTP speculation needs the main model's `last_streams` (forward(return_streams=...)).")
        if self.pending:
            self.cache.crop(-self.pending)
            self.pending = 0
        streams = model_outputs.last_streams
        # Prefill: the streams of the last prompt positions; afterwards: the accepted positions of the last call.
        n_new = streams.shape[1] if not self.prefilled else int(n_last_matches) + 1
        if not self.prefilled:
            # Positions before these lie outside the block's window: start its cache there.
            self.cache.skip(input_ids.shape[1] - 1 - n_new, device=input_ids.device)
            self.prefilled = True
        streams = streams[:, :n_new].to(input_ids.device)
        logits, out_streams = self._run_block(streams, input_ids[:, -n_new:])

        k = min(self.num_drafts, self.max_length - input_ids.shape[1] - 1)
        if k <= 0:
            return input_ids, None
        candidate_ids, drafted_logits = input_ids, []
        for i in range(k):
            if i > 0:
                # Draft i + 1: the block's output streams stand in for the (unknown) main streams.
                logits, out_streams = self._run_block(out_streams, candidate_ids[:, -1:])
                self.pending += 1
            token, processed = self._pick(logits, candidate_ids)
            candidate_ids = torch.cat([candidate_ids, token], dim=1)
            drafted_logits.append(processed)
        self.last_drafted = k
        return candidate_ids, torch.stack(drafted_logits, dim=1)
