"""Edit methods. Each lives in its own subpackage (config, computation) and registers itself by name.

Importing this package registers the built-in methods; :func:`get_method` looks one up by name.
"""

from ..packs.delta import LowRankDelta, WeightDelta
from . import alphaedit, ft, grace, ike, kn, lora, memit, mend, rome, serac, ultraedit, wise  # noqa: F401  (each registers itself)
from .base import REGISTRY, EditMethod, MethodConfig, get_method, register_method

__all__ = ["REGISTRY", "EditMethod", "LowRankDelta", "MethodConfig", "WeightDelta", "get_method", "register_method"]
