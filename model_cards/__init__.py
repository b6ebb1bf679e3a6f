"""Model cards for DeepSeek-V4 folders produced by this plugin (installed as `modeling_deepseek_v4.model_cards`)."""

# From a checkout's root this folder is also importable as the top-level `model_cards`, which would load its files a
# second time as other modules (other classes, e.g. a second exception type); only the installed name is allowed.
if __name__ != "modeling_deepseek_v4.model_cards":
    raise ImportError(
        f"`{__name__}` is this repository's model_cards/ folder; import it as `modeling_deepseek_v4.model_cards`."
    )

from .push import prepare_upload, push_folder
from .render import render_model_card, write_model_card

__all__ = ["prepare_upload", "push_folder", "render_model_card", "write_model_card"]
