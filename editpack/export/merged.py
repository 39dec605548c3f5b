"""A merged model folder: packs folded into the weights and written as a transformers model, atomically, with
the record of what it holds."""

from __future__ import annotations

from pathlib import Path

import torch

from .._io import atomic_directory, atomic_write_json, check_output
from ..errors import PackFormatError
from ..model.fingerprint import unwrap
from ..model.quiet import quiet_progress
from ..packs.manifest import MERGED_RECORD
from ..runtime.apply import applied, apply, revert
from ..runtime.combine import as_packs, check_mergeable


def export_merged(model: torch.nn.Module, packs, output, *, tokenizer=None, check: bool = True,
                  on_conflict: str = "error", overwrite: bool = False):
    """Merge ``packs`` into ``model`` and write the result as a transformers model folder at ``output``.

    The folder appears atomically (nothing is left behind on failure or interruption) and records the packs it
    holds in ``editpack_applied.json`` (names, versions, content hashes: no local paths). Packs that cannot be
    merged (memory packs) are refused. ``model`` is reverted to its original weights afterwards. Returns the
    applied records.
    """

    ref = getattr(unwrap(model), "editpack_ref", None)
    source = Path(ref.path).resolve() if ref is not None and Path(ref.path).exists() else None
    if source is not None and (source == Path(output).resolve() or source in Path(output).resolve().parents):
        raise PackFormatError(f"{output} is the folder model {ref.id!r} was loaded from; write the merged model "
                              "elsewhere")
    check_output(output, overwrite=overwrite)
    loaded = as_packs(packs)
    check_mergeable(loaded)
    tokenizer = tokenizer or getattr(unwrap(model), "editpack_tokenizer", None)
    merged = apply(model, loaded, merge=True, check=check, on_conflict=on_conflict)
    kept = applied(merged)
    try:
        with atomic_directory(Path(output), overwrite=overwrite) as tmp, quiet_progress():
            merged.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / MERGED_RECORD, {
                "base_model": loaded[0].base.to_dict(),
                "packs": [{"name": r.pack.name, "version": r.pack.version, "content": r.pack.content_id}
                          for r in kept],
            })
    finally:
        revert(merged)
    return kept
