"""MEMIT: many facts at once, the residual change spread over several layers' MLP output projections."""

from .config import MEMITConfig
from .method import MEMIT

__all__ = ["MEMIT", "MEMITConfig"]
