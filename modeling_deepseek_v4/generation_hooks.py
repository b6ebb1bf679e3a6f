"""`generate` hooks of `DeepseekV4ExtForCausalLM` (a mixin before `PreTrainedModel` / `GenerationMixin`).

- the cache: a `DeepseekV4Cache`, or `DeepseekV4StaticCache` for `cache_implementation="static"`
  (docs/hf-integration.md §6.1), under the cache name of the installed transformers (compat.py). Assisted,
  prompt-lookup and MTP decoding get a cache that can roll back as many positions as one verification can reject
  (`rollback_horizon`), and an assistant's cache its round's drafts;
- MTP self-speculative decoding: `generate(..., use_mtp=True)` drafts with the model's own MTP block
  (`mtp_speculation.py`); DSpark: `generate(..., use_dspark=True)` drafts blocks with the -0731 drafter
  (`dspark_drafting.py`), through the same assisted-decoding loop;
- inputs: the model always gets the 2-D attention mask (it does its own masking).
"""

from __future__ import annotations

import copy

from transformers.generation import GenerationConfig, GenerationMode

from .cache import DeepseekV4Cache
from .compat import CACHE_FIELD, cache_of
from .dspark_drafting import build_dspark_candidate_generator, capture_taps
from .mtp_speculation import build_mtp_candidate_generator
from .static_cache import NO_ROLLBACK_MESSAGE, DeepseekV4StaticCache


def rollback_horizon(generation_config, prompt_length: int, assistant_model=None) -> int:
    """The most positions one verification step of this assisted mode can reject, i.e. what the main model's cache
    must be able to `crop`: the drafts per step, and never more than the new tokens (the prompt does not count). An
    assistant model's heuristic schedule grows its drafts each round, so only the generation budget bounds it."""
    budget = max((generation_config.max_length or 0) - prompt_length, 1)
    if generation_config.prompt_lookup_num_tokens is not None:
        return min(budget, generation_config.prompt_lookup_num_tokens)
    if getattr(generation_config, "use_dspark", False):
        return min(budget, getattr(generation_config, "dspark_block_size", None) or 1)
    if generation_config.use_mtp:
        return min(budget, getattr(generation_config, "mtp_num_drafts", None) or 1)
    drafting = assistant_model.generation_config if assistant_model is not None else generation_config
    # transformers' defaults for an assistant whose config leaves them unset.
    schedule = drafting.num_assistant_tokens_schedule or "constant"
    if schedule == "constant":
        return min(budget, drafting.num_assistant_tokens or 20)
    return budget


def refuse_under_pipeline(model, mode: str) -> None:
    """Speculative decoding with the model's own MTP block / DSpark drafter needs the final streams, which only the
    last pipeline stage has (pipeline_support.py): refuse it on every stage alike, with the reason."""
    stage = getattr(model, "_pp_stage", None)
    if stage is not None and stage.pp_size > 1:
        raise NotImplementedError(
            f"{mode} is not supported under pipeline parallelism (pp_size={stage.pp_size}): the drafter needs the "
            "final mHC streams, which only the last stage holds. Generate without it, or load with tp_size / ep_size."
        )


class DeepseekV4GenerationHooks:
    """Overrides of `GenerationMixin` internals; `self.config` is a `DeepseekV4ExtConfig`."""

    def generate(self, *args, use_dspark: bool | None = None, dspark_confidence_threshold=None, **kwargs):
        """transformers' `generate`; `use_dspark=True` (or a `GenerationConfig` with `use_dspark=True`) drafts with the
        DSpark drafter of a -0731 / -DSpark checkpoint (dspark_drafting.py), `dspark_confidence_threshold` cutting
        each draft at its first position of lower confidence."""
        config = kwargs.get("generation_config")
        if use_dspark is None:
            use_dspark = bool(getattr(config, "use_dspark", False))
        if not use_dspark:
            return super().generate(*args, **kwargs)
        refuse_under_pipeline(self, "use_dspark=True")
        if getattr(self.model, "dspark", None) is None:
            raise ValueError(
                "use_dspark=True needs the DSpark drafter of a DeepSeek-V4-Flash-0731 / -DSpark checkpoint "
                "(`model.model.dspark`); this model has none. For the MTP block use use_mtp=True."
            )
        # DSpark rides on transformers' assisted-decoding loop, which `use_mtp` selects (GenerationConfig field).
        # The flags go on a copy of the config generate starts from: the caller's, or the model's own (swapped in
        # for this call, so that keyword arguments still apply on top of it, explicit None values included).
        config = copy.deepcopy(config if config is not None else self.generation_config or GenerationConfig())
        config.use_mtp = config.use_dspark = True
        config.dspark_block_size = self.config.dspark_block_size
        if dspark_confidence_threshold is not None:
            config.dspark_confidence_threshold = dspark_confidence_threshold
        own = self.generation_config
        if "generation_config" in kwargs:
            kwargs["generation_config"] = config
        else:
            self.generation_config = config
        with capture_taps(self) as taps:
            self._dspark_taps = taps
            try:
                return super().generate(*args, **kwargs)
            finally:
                self._dspark_taps, self.generation_config = None, own

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode=None, batch_size=None, max_cache_length=None, *args
    ):
        """Give `generate` a `DeepseekV4Cache` instead of a `DynamicCache` (docs/hf-integration.md §6.1). As an
        assistant, the cache can roll back this round's drafts (the main model rejects some); the main model's
        cache is sized for its decoding mode in `_get_candidate_generator`, which knows the prompt."""
        # An assistant round drafts at most `max_new_tokens`; its cache is reused and grown round after round.
        rollback = (generation_config.max_new_tokens or 1) if generation_config.is_assistant else 0
        cache = cache_of(model_kwargs)
        if cache is None and generation_config.use_cache is not False:
            impl = generation_config.cache_implementation
            if impl == "static":
                if generation_mode == GenerationMode.ASSISTED_GENERATION or rollback:
                    raise ValueError(NO_ROLLBACK_MESSAGE)
                length = max(
                    max_cache_length or 0,
                    generation_config.max_length or 0,
                    getattr(generation_config, "max_cache_len", None) or 0,
                )
                model_kwargs[CACHE_FIELD] = DeepseekV4StaticCache(self.config, max_cache_len=length)
                return
            if impl not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={impl!r} is not supported by DeepSeek-V4; use None / 'dynamic' "
                    "(DeepseekV4Cache, rollback-capable) or 'static' (DeepseekV4StaticCache, compilable)."
                )
            model_kwargs[CACHE_FIELD] = DeepseekV4Cache(self.config, rollback_tokens=rollback)
            return
        if isinstance(cache, DeepseekV4Cache) and rollback:
            cache.ensure_rollback(rollback)
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args
        )

    def _get_candidate_generator(self, generation_config, input_ids, *args, **kwargs):
        """Size the cache for the assisted mode (`rollback_horizon`), then: with `use_dspark=True` / `use_mtp=True` the
        model's own DSpark drafter / MTP block drafts (dspark_drafting.py, mtp_speculation.py), else transformers'
        generators."""
        model_kwargs = kwargs.get("model_kwargs", args[2] if len(args) > 2 else {})
        cache = cache_of(model_kwargs)
        if isinstance(cache, DeepseekV4Cache):
            horizon = rollback_horizon(generation_config, input_ids.shape[-1], kwargs.get("assistant_model"))
            cache.ensure_rollback(horizon, exact=True)
        if getattr(generation_config, "use_dspark", False):
            return build_dspark_candidate_generator(self, generation_config, input_ids, *args, **kwargs)
        if generation_config.use_mtp:
            refuse_under_pipeline(self, "use_mtp=True")
            return build_mtp_candidate_generator(self, generation_config, input_ids, *args, **kwargs)
        return super()._get_candidate_generator(generation_config, input_ids, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        """As transformers', but always hand the model the 2-D mask: it does its own masking, and `generate`
        would otherwise build 4-D masks for compileable caches (the static cache). With `inputs_embeds`, the
        prompt's `input_ids` (when given to `generate` too) stay next to them: hash-routed layers pick experts by
        token id."""
        inputs = super().prepare_inputs_for_generation(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )
        embeds = inputs.get("inputs_embeds")
        if embeds is not None and inputs.get("input_ids") is None and input_ids is not None:
            if input_ids.shape[1] >= embeds.shape[1] > 0:
                inputs["input_ids"] = input_ids[:, -embeds.shape[1] :]
        if attention_mask is None:
            inputs.pop("attention_mask", None)
        else:
            inputs["attention_mask"] = attention_mask
        return inputs
