"""SERAC-style memory packs: facts and a scope classifier instead of a weight delta (see ``editpack.packs.memory``)."""

from .config import SERACConfig
from .method import SERAC

__all__ = ["SERAC", "SERACConfig"]
