"""Model cards for DeepSeek-V4 folders produced by this plugin (installed as `modeling_deepseek_v4.model_cards`)."""

from .render import render_model_card, write_model_card

__all__ = ["render_model_card", "write_model_card"]
