"""editpack: knowledge edits of language models as versioned, shareable packs.

Public API (see the README):

- :func:`load_model` — built-in short names, local folders, GGUF files, Hub ids.
- :func:`generate` — batched greedy continuations.
- :mod:`editpack.arch` — architecture specs (data files, one per model family).
- :mod:`editpack.nethook` — read and patch module inputs/outputs during a forward pass.
"""

from ._version import __version__
from .arch import ArchSpec, spec_for
from .errors import EditpackError
from .generation import generate
from .models import DEFAULT_MODEL, load_model

__all__ = [
    "__version__",
    "ArchSpec",
    "DEFAULT_MODEL",
    "EditpackError",
    "generate",
    "load_model",
    "spec_for",
]
