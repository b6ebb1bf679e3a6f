"""The one seam between the transformers versions this package supports (docs/hf-integration.md §1, §12).

transformers 5.24 renamed the generation cache argument: `generate()` passes `cache=` to the model and reads
`outputs.cache`, model outputs declare a `cache` field, and `past_key_values` only survives as a deprecated alias
(until 5.40) that logs a warning. 5.23 passes and reads `past_key_values`. Everything in this package that hands a
cache to transformers or takes one from it goes through the names defined here, so neither version warns and
neither silently starts every decoding step with an empty cache:

- `CACHE_FIELD`: the name this transformers uses in `model_kwargs` and on model outputs, detected from the output
  dataclass itself (a feature check, not a version check);
- `pick_cache(cache, past_key_values)`: what a `forward` received under either name;
- `cache_of(outputs_or_kwargs)`: the cache held by a model / `generate` output or a `model_kwargs` dict;
- `with_cache_aliases`: our output classes answer both `.cache` and `.past_key_values`, silently;
- `peft_version_hint`: transformers >= 5.24 refuses `model.add_adapter` / `load_adapter` with PEFT < 0.22; the
  error then says what works instead;
- `quiet_bitsandbytes_import`: PEFT imports bitsandbytes when it is installed, and on CPUs with AVX512-BF16
  bitsandbytes 0.50 then logs that its optional `kernels` package (a faster CPU 4-bit GEMM from the Hub) is missing:
  one stray line on every import of this package, in the CLIs' one-line errors too. Dropped while we import PEFT;
  a user who imports bitsandbytes first still sees it.

`TRANSFORMERS_REQUIREMENT` is the tested range (also written into saved folders' `requirements.txt`); widen its
upper bound only after the whole suite passes on the new release (README, "Supported versions").
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import fields

from transformers.modeling_outputs import MoeModelOutputWithPast

# Floor and newest *tested* minor; `pyproject.toml` declares the same range (a test checks they agree).
TRANSFORMERS_REQUIREMENT = "transformers>=5.23,<5.25"
# `requirements.txt` of every folder this package writes (save_pretrained, dsv4-convert to-hf).
REQUIREMENTS_TXT = f"torch>=2.11\n{TRANSFORMERS_REQUIREMENT}\n"

CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(MoeModelOutputWithPast)} else "past_key_values"
_OLD_CACHE_FIELD = "past_key_values" if CACHE_FIELD == "cache" else "cache"


def pick_cache(cache=None, past_key_values=None):
    """The cache a `forward` was given as `cache=` (transformers >= 5.24) or `past_key_values=` (5.23, and
    callers that keep the old name); both at once must be the same object."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError(
            "Got two different caches, `cache=` and `past_key_values=` (the old name of the same argument); "
            "pass only one of them."
        )
    return cache if cache is not None else past_key_values


def cache_of(container):
    """The cache in a model output, a `generate` output or a `model_kwargs` dict, under this transformers' name,
    without touching the deprecated alias (which warns on 5.24)."""
    return container.get(CACHE_FIELD)


def cache_kwargs(cache) -> dict:
    """`{CACHE_FIELD: cache}`: the keyword under which this transformers expects a cache in `model_kwargs` and in
    output constructors."""
    return {CACHE_FIELD: cache}


def with_cache_aliases(cls):
    """Class decorator for our `ModelOutput` dataclasses: `.cache` and `.past_key_values` both read the cache field,
    on either transformers version, with no deprecation warning."""
    setattr(cls, _OLD_CACHE_FIELD, property(lambda self: getattr(self, CACHE_FIELD), doc="Alias of the cache field."))
    return cls


@contextlib.contextmanager
def peft_version_hint(method: str):
    """Re-raise transformers' "PEFT version is not compatible" error of `model.<method>` with what to use instead:
    transformers 5.24 asks PEFT >= 0.22 for its adapter mixin, while `peft.get_peft_model` and
    `peft.PeftModel.from_pretrained` keep working with older PEFT releases."""
    try:
        yield
    except ValueError as exc:
        if "version of PEFT" not in str(exc):
            raise
        raise ImportError(
            f"model.{method}() comes from transformers' PEFT integration, which needs a newer PEFT than the one "
            f"installed ({exc}). With this PEFT, use `peft.get_peft_model(model, LoraConfig(...))` to add a trainable "
            "adapter and `peft.PeftModel.from_pretrained(model, adapter_dir)` to load one (both work with this "
            "model), or upgrade PEFT."
        ) from exc


class _DropKernelsHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


@contextlib.contextmanager
def quiet_bitsandbytes_import():
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning inside the block."""
    bnb_logger, hint = logging.getLogger("bitsandbytes.backends.cpu.ops"), _DropKernelsHint()
    bnb_logger.addFilter(hint)
    try:
        yield
    finally:
        bnb_logger.removeFilter(hint)
