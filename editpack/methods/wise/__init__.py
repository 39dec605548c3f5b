"""WISE: a side memory for one layer, edited in shards and merged, behind a router (see ``editpack.packs.side_memory``)."""

from .config import WISEConfig
from .method import WISE

__all__ = ["WISE", "WISEConfig"]
