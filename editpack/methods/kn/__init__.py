"""KN: knowledge neurons found by integrated gradients; their value vectors moved toward the new answer."""

from .config import KNConfig
from .method import KN

__all__ = ["KN", "KNConfig"]
