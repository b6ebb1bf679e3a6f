"""Official DeepSeek-V4 checkpoints <-> this plugin's Hugging Face format (installed as
`modeling_deepseek_v4.conversion`; console script `dsv4-convert`). Spec: docs/official-format.md."""

# From a checkout's root this folder is also importable as the top-level `conversion`, which would load its files a
# second time as other modules (other classes, e.g. a second exception type); only the installed name is allowed.
if __name__ != "modeling_deepseek_v4.conversion":
    raise ImportError(
        f"`{__name__}` is this repository's conversion/ folder; import it as `modeling_deepseek_v4.conversion`."
    )

from .checkpoint import ConversionError
from .to_official import convert_plugin_to_official
from .to_plugin import convert_official_to_plugin
from .transcode import transcode_experts_to_fp8
from .verify import verify_folder

__all__ = [
    "ConversionError",
    "convert_official_to_plugin",
    "convert_plugin_to_official",
    "transcode_experts_to_fp8",
    "verify_folder",
]
