"""MEND (Mitchell et al. 2022): a learned editor turns the fine-tuning gradient's rank-1 factors into an edit."""

from .config import MENDConfig
from .method import MEND

__all__ = ["MEND", "MENDConfig"]
