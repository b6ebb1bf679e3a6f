"""`generate` hooks of `DeepseekV4ForCausalLM` (a mixin before `PreTrainedModel` / `GenerationMixin`).

- the cache: a rollback-capable `DeepseekV4Cache`, or `DeepseekV4StaticCache` for `cache_implementation="static"`
  (hf-integration.md §6.1);
- MTP self-speculative decoding: `generate(..., use_mtp=True)` drafts with the model's own MTP block
  (`mtp_speculation.py`);
- inputs: the model always gets the 2-D attention mask (it does its own masking).
"""

from __future__ import annotations

from .cache import DeepseekV4Cache
from .mtp_speculation import build_mtp_candidate_generator
from .static_cache import DeepseekV4StaticCache


class DeepseekV4GenerationHooks:
    """Overrides of `GenerationMixin` internals; `self.config` is a `DeepseekV4Config`."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Give `generate` a `DeepseekV4Cache` instead of a `DynamicCache` (hf-integration.md §6.1)."""
        impl = generation_config.cache_implementation
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            if impl == "static":
                length = max(
                    kwargs.get("max_cache_length", args[2] if len(args) > 2 else 0), generation_config.max_length or 0
                )
                model_kwargs["past_key_values"] = DeepseekV4StaticCache(self.config, max_cache_len=length)
                return
            if impl not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={impl!r} is not supported by DeepSeek-V4; use None / 'dynamic' "
                    "(DeepseekV4Cache, rollback-capable) or 'static' (DeepseekV4StaticCache, compilable)."
                )
            model_kwargs["past_key_values"] = DeepseekV4Cache(self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

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
