"""FT-M: fine-tuning one MLP output projection on the new targets' tokens (the prompt masked out)."""

from .config import FTConfig
from .method import FT

__all__ = ["FT", "FTConfig"]
