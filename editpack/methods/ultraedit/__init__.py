"""UltraEdit: training-free lifelong editing from one gradient, with lifelong normalisation (weight packs)."""

from .config import UltraEditConfig
from .method import UltraEdit

__all__ = ["UltraEdit", "UltraEditConfig"]
