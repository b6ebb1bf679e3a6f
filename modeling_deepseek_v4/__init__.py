"""DeepSeek-V4 for Hugging Face transformers: `import modeling_deepseek_v4` registers the plugin's own
`model_type` ("deepseek_v4_ext") with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`.

transformers' native `deepseek_v4` is never touched: our config class is registered under our own model type,
and the model classes are keyed by our config class object (hf-integration.md §2); `route_official_checkpoints()`
is the explicit opt-in that sends `deepseek_v4` folders to this package. Official folders load directly through
`DeepseekV4ExtForCausalLM.from_pretrained` either way (`official_loader.py`). Registration is idempotent, so
the pip package and a Hub copy of these files can both be imported in one process.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import DeepseekV4Cache
from .configuration_deepseek_v4 import DeepseekV4ExtConfig
from .modeling_deepseek_v4 import DeepseekV4ExtForCausalLM, DeepseekV4ExtModel, DeepseekV4ExtPreTrainedModel
from .official_routing import route_official_checkpoints
from .ops import use_backend

__version__ = "0.1.0"

AutoConfig.register(DeepseekV4ExtConfig.model_type, DeepseekV4ExtConfig, exist_ok=True)
# exist_ok: the pip package and a Hub copy of these files may both register (idempotent, hf-integration.md §2).
AutoModel.register(DeepseekV4ExtConfig, DeepseekV4ExtModel, exist_ok=True)
AutoModelForCausalLM.register(DeepseekV4ExtConfig, DeepseekV4ExtForCausalLM, exist_ok=True)
# `save_pretrained` / `push_to_hub` then write `auto_map` and copy the flat modeling files, so a saved folder loads
# with `trust_remote_code=True` where this package is not installed (hf-integration.md §5).
DeepseekV4ExtConfig.register_for_auto_class()
DeepseekV4ExtModel.register_for_auto_class("AutoModel")
DeepseekV4ExtForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "DeepseekV4Cache",
    "DeepseekV4ExtConfig",
    "DeepseekV4ExtForCausalLM",
    "DeepseekV4ExtModel",
    "DeepseekV4ExtPreTrainedModel",
    "route_official_checkpoints",
    "use_backend",
]
