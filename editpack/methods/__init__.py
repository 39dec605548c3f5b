"""Edit methods. Each lives in its own subpackage (config, computation) and registers itself by name.

Importing this package registers the built-in methods; :func:`get_method` looks one up by name.
"""

from .base import REGISTRY, EditMethod, MethodConfig, get_method, register_method
from ..packs.delta import LowRankDelta, WeightDelta
from . import (  # noqa: F401  (each registers itself)
    alphaedit, ft, grace, kn, lora, memit, mend, rome, serac, ultraedit, wise
)

__all__ = ["REGISTRY", "EditMethod", "LowRankDelta", "MethodConfig", "WeightDelta", "get_method", "register_method"]
