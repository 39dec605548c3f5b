"""GRACE: edits kept in a codebook at one layer (keys, replacement values, deferral radii); see ``editpack.packs.codebook``."""

from .config import GRACEConfig
from .method import GRACE

__all__ = ["GRACE", "GRACEConfig"]
