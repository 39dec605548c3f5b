"""Where editpack keeps its caches (converted models, key statistics, context templates).

Everything lives under one directory: ``$EDITPACK_HOME`` if set, else the user's cache directory
(``~/.cache/editpack`` on Linux). Nothing is ever written into the current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def editpack_home() -> Path:
    """Return the root cache directory, creating it if needed."""
    env = os.environ.get("EDITPACK_HOME")
    root = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("editpack"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(kind: str) -> Path:
    """Return ``<home>/<kind>``, creating it if needed (``kind`` is ``models``, ``stats``, ...)."""
    path = editpack_home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
