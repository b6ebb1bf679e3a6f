"""`generate` hooks of `DeepseekV4ForCausalLM` (a mixin before `PreTrainedModel` / `GenerationMixin`).

- the cache: a `DeepseekV4Cache`, or `DeepseekV4StaticCache` for `cache_implementation="static"`
  (docs/hf-integration.md §6.1), under the cache name of the installed transformers (compat.py). Speculative modes
  get a cache that can roll back as many positions as one verification can reject (`rollback_horizon`);
- MTP self-speculative decoding: `generate(..., use_mtp=True)` drafts with the model's own MTP block
  (`mtp_speculation.py`);
- inputs: the model always gets the 2-D attention mask (it does its own masking).
"""

from __future__ import annotations

from transformers.generation import GenerationMode

from .cache import DeepseekV4Cache
from .compat import CACHE_FIELD, cache_of
from .mtp_speculation import build_mtp_candidate_generator
from .static_cache import DeepseekV4StaticCache


def rollback_horizon(generation_config, generation_mode) -> int:
    """The most positions one verification step of this decoding mode can reject, i.e. what the cache must be able
    to `crop` (0: no rollback, no history kept). An assistant's drafts per round are this call's `max_new_tokens`;
    the heuristic draft schedule grows without bound other than the generation budget."""
    budget = generation_config.max_new_tokens or generation_config.max_length or 0
    if generation_config.is_assistant:
        return budget
    if generation_mode != GenerationMode.ASSISTED_GENERATION:
        return 0
    if generation_config.prompt_lookup_num_tokens is not None:
        return min(budget, generation_config.prompt_lookup_num_tokens)
    if generation_config.use_mtp:
        return min(budget, getattr(generation_config, "mtp_num_drafts", None) or 1)
    if generation_config.num_assistant_tokens_schedule == "constant":
        return min(budget, generation_config.num_assistant_tokens)
    return budget


class DeepseekV4GenerationHooks:
    """Overrides of `GenerationMixin` internals; `self.config` is a `DeepseekV4Config`."""

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode=None, batch_size=None, max_cache_length=None, *args
    ):
        """Give `generate` a `DeepseekV4Cache` instead of a `DynamicCache` (docs/hf-integration.md §6.1), able to
        roll back what the decoding mode may reject; a user's cache is made able to as well."""
        rollback = rollback_horizon(generation_config, generation_mode)
        cache = cache_of(model_kwargs)
        if cache is None and generation_config.use_cache is not False:
            impl = generation_config.cache_implementation
            if impl == "static":
                if rollback:
                    raise ValueError(
                        "cache_implementation='static' cannot roll back rejected draft tokens; drop it for "
                        "assisted, prompt-lookup or MTP decoding (the default DeepseekV4Cache rolls back exactly)."
                    )
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

    # --- MTP self-speculative decoding hook: `generate(..., use_mtp=True)`; the logic is in mtp_speculation.py ---
    def _get_candidate_generator(self, generation_config, *args, **kwargs):
        """With `use_mtp=True` the model's own MTP block drafts (`DeepseekV4MTPCandidateGenerator`)."""
        if generation_config.use_mtp:
            return build_mtp_candidate_generator(self, generation_config, *args, **kwargs)
        return super()._get_candidate_generator(generation_config, *args, **kwargs)

    # --- end of the MTP hook ---

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """As transformers', but always hand the model the 2-D mask: it does its own masking, and `generate`
        would otherwise build 4-D masks for compileable caches (the static cache)."""
        inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            inputs.pop("attention_mask", None)
        else:
            inputs["attention_mask"] = attention_mask
        return inputs
