"""Where packs come from: local directories (and, later, the Hugging Face Hub)."""

from __future__ import annotations

from pathlib import Path

from .pack import EditPack


def resolve_pack(reference) -> EditPack:
    """Load the pack ``reference`` names: a local pack directory."""
    return EditPack.load(Path(reference))
