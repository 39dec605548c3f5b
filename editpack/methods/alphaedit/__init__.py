"""AlphaEdit: MEMIT's update projected onto the null space of preserved knowledge, for sequential editing."""

from .config import AlphaEditConfig
from .method import AlphaEdit

__all__ = ["AlphaEdit", "AlphaEditConfig"]
