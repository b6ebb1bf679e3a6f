"""Model cards for DeepSeek-V4 folders produced by this plugin (installed as `modeling_deepseek_v4.model_cards`)."""

from .push import prepare_upload, push_folder
from .render import render_model_card, write_model_card

__all__ = ["prepare_upload", "push_folder", "render_model_card", "write_model_card"]
