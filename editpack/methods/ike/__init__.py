"""IKE (Zheng et al., 2023): in-context knowledge editing, kept as a memory pack answered with demonstrations."""

from .config import IKEConfig
from .method import IKE

__all__ = ["IKE", "IKEConfig"]
