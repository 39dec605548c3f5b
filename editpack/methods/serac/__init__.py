"""SERAC-style memory packs: facts and a scope classifier instead of a weight delta (see ``editpack.memory``)."""

from .config import IKEConfig, SERACConfig
from .method import IKE, SERAC

__all__ = ["IKE", "IKEConfig", "SERAC", "SERACConfig"]
