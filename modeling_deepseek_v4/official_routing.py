"""Opt-in: route `model_type: deepseek_v4` (the official releases, native-saved folders) to this package.

transformers maps `deepseek_v4` to its native classes, and this package never changes that on import
(docs/hf-integration.md §2). `route_official_checkpoints()` is the one call that does, for users whose code (or
library: TRL's `SFTTrainer(model="deepseek-ai/DeepSeek-V4-Flash")`, pipelines) goes through `AutoConfig` /
`AutoModel` / `AutoModelForCausalLM`: afterwards those build this package's classes, loading the official layout
directly (`official_loader.py`). The models they return are `DeepseekV4ExtForCausalLM` / `DeepseekV4ExtModel` with
a `DeepseekV4ExtConfig`, so what they save is an ordinary plugin folder.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_deepseek_v4 import DeepseekV4ExtConfig
from .modeling_deepseek_v4 import DeepseekV4ExtForCausalLM, DeepseekV4ExtModel
from .official_loader import OFFICIAL_MODEL_TYPE

# Keys of official files that have no meaning here: `quantization_config` would hand the weights to transformers'
# own FP8 quantizer; the official layout's formats are read from the tensor dtypes instead (official-format.md §3).
_OFFICIAL_ONLY = ("quantization_config", "scale_fmt", "scale_dtype")


class DeepseekV4OfficialConfig(DeepseekV4ExtConfig):
    """An official `config.json` (`model_type: deepseek_v4`) read as this package's configuration."""

    model_type = OFFICIAL_MODEL_TYPE

    def __init__(self, **kwargs):
        for key in _OFFICIAL_ONLY:
            kwargs.pop(key, None)
        super().__init__(**kwargs)


class DeepseekV4OfficialForCausalLM(DeepseekV4ExtForCausalLM):
    """Entry point of `AutoModelForCausalLM` for `deepseek_v4` folders once routed; builds the plugin's class."""

    config_class = DeepseekV4OfficialConfig

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return DeepseekV4ExtForCausalLM.from_pretrained(*args, **kwargs)


class DeepseekV4OfficialModel(DeepseekV4ExtModel):
    """Entry point of `AutoModel` for `deepseek_v4` folders once routed; builds the plugin's base model."""

    config_class = DeepseekV4OfficialConfig

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return DeepseekV4ExtModel.from_pretrained(*args, **kwargs)


def route_official_checkpoints() -> None:
    """Make `AutoConfig` / `AutoModel` / `AutoModelForCausalLM` build this package's classes for
    `model_type: deepseek_v4` in this process (idempotent; there is no undo short of a new process). Official
    releases then load directly, FP8 / FP4 kept unless a `dtype` is given (`official_loader.py`)."""
    AutoConfig.register(OFFICIAL_MODEL_TYPE, DeepseekV4OfficialConfig, exist_ok=True)
    AutoModel.register(DeepseekV4OfficialConfig, DeepseekV4OfficialModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekV4OfficialConfig, DeepseekV4OfficialForCausalLM, exist_ok=True)
