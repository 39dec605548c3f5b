"""ROME (Meng et al., 2022): a rank-one update of one MLP output projection per fact."""

from .config import ROMEConfig
from .method import ROME

__all__ = ["ROME", "ROMEConfig"]
