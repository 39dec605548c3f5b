"""Exception types raised by editpack.

Every error a user can cause derives from :class:`EditpackError`, so callers (and the CLI) can tell bad input
from bugs. Messages name the offending thing (file, record, module, model) and what to do about it.
"""

from __future__ import annotations


class EditpackError(Exception):
    """Base class of all errors editpack raises on purpose."""


class ModelNotFoundError(EditpackError):
    """A model name or path could not be resolved to loadable weights."""


class MissingPackageError(EditpackError):
    """An optional package needed for the requested operation is not installed."""


class UnknownArchitectureError(EditpackError):
    """No architecture spec file describes the model's ``model_type``."""


class InvalidFactError(EditpackError):
    """A fact record is malformed (subject missing from the prompt, empty target, ...)."""


class PackFormatError(EditpackError):
    """A pack directory is missing files, has a bad manifest, or fails hash verification."""


class FingerprintMismatchError(EditpackError):
    """A pack was made for different base weights than those of the model it is applied to."""


class UnknownMethodError(EditpackError):
    """No edit method is registered under the requested name."""


class PackConflictError(EditpackError):
    """Packs that cannot be applied or stacked together (conflicting facts, missing parents, other bases)."""
