"""What every export shares: the packs taken as one adapter (the rules of :func:`editpack.stack`), their summed
delta, ranks fitted and padded, and the record an export folder holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .._lazy import transformers
from ..errors import EditpackError
from ..model.arch import ArchSpec
from ..model.loading import resolve_model
from ..packs.delta import LowRankDelta
from ..packs.weights import EditPack
from ..runtime.combine import as_packs, check_stackable, resolve_conflicts

EXPORT_RECORD = "editpack_export.json"


class ExportError(EditpackError):
    """A pack cannot be written in the form a runtime reads."""


# ---------------------------------------------------------------------------------------------- the delta
@dataclass
class Export:
    """What an export wrote: the folder or file, the rank, the modules, the bytes, and notes for the user."""

    path: Path
    target: str
    rank: int
    modules: list[str]
    bytes: int
    notes: list[str] = field(default_factory=list)


def weight_packs(packs, on_conflict: str = "error") -> list[EditPack]:
    """The packs to export as one adapter: :func:`editpack.apply`'s and :func:`editpack.stack`'s rules (no pack
    twice, conflicts refused or the later pack winning, one base), and weight packs only."""
    loaded = as_packs(packs)
    if not loaded:
        raise ExportError("no pack to export")
    wrong = [p.ref for p in loaded if not p.holds_weights]
    if wrong:
        raise ExportError(f"{', '.join(wrong)} hold no weight delta an engine can load as is (memory, codebook and "
                          "side-memory packs route inputs at run time, which no serving engine does); export weight "
                          "packs")
    bases = {(p.base.id, p.base.model_type) for p in loaded}
    if len(bases) > 1:
        raise ExportError(f"the packs were made for different models ({sorted(bases)}); export them separately")
    if any(p.fan_in_fan_out for p in loaded):
        raise ExportError("packs of transposed (Conv1D, GPT-2 style) layers cannot be exported for serving engines")
    loaded = resolve_conflicts(loaded, on_conflict)
    check_stackable(loaded)
    return loaded


def combined_delta(packs: Sequence[EditPack]) -> dict[str, LowRankDelta]:
    """Every pack's stored factors, concatenated per module: the sum of the packs' deltas, exactly."""
    out: dict[str, LowRankDelta] = {}
    for pack in packs:
        for name, delta in pack.stored_factors().items():
            delta = LowRankDelta(delta.B.float(), delta.A.float())
            out[name] = out[name].concat(delta) if name in out else delta
    return out


def fit_rank(name: str, delta: LowRankDelta, limit: int | None, target: str) -> LowRankDelta:
    """``delta`` itself when its rank is within ``limit``, else exact SVD factors if its numerical rank fits."""
    if limit is None or delta.rank <= limit:
        return delta
    u, s, vh = torch.linalg.svd(delta.dense().double(), full_matrices=False)
    keep = int((s > s[0] * 1e-7).sum()) if s.numel() and s[0] > 0 else 0
    if keep > limit:
        raise ExportError(f"{name} has rank {keep} (of {delta.rank} stored), over {target}'s maximum of {limit}; "
                          "export fewer packs together, or a pack whose delta is low-rank")
    keep = max(keep, 1)
    return LowRankDelta(B=(u[:, :keep] * s[:keep]).float(), A=vh[:keep].float())


def pad_rank(delta: LowRankDelta, rank: int) -> LowRankDelta:
    extra = rank - delta.rank
    if extra <= 0:
        return delta
    return LowRankDelta(B=torch.cat([delta.B, delta.B.new_zeros(delta.B.shape[0], extra)], dim=1),
                        A=torch.cat([delta.A, delta.A.new_zeros(extra, delta.A.shape[1])], dim=0))


def layer_of(spec: ArchSpec, name: str) -> tuple[int, str]:
    """``(layer, suffix)`` of a module inside the decoder blocks (``model.layers.5.mlp.down_proj`` → 5, mlp.down_proj)."""
    layer = spec.block_of(name)
    if layer is None:
        raise ExportError(f"{name} is not inside the decoder blocks ({spec.blocks}); engines address LoRA by layer")
    return layer, name[len(spec.block_name(layer)) + 1:]


def num_layers_of(model: str | None, packs: Sequence[EditPack]) -> int:
    """The base model's depth, from ``model`` or the packs' base (its config only)."""

    source = model or packs[0].base.id
    try:
        config = transformers.AutoConfig.from_pretrained(resolve_model(source).path)
    except Exception as exc:  # noqa: BLE001  (any failure to find the config says the same thing to the user)
        raise ExportError(f"this export needs the base model's number of layers and cannot read the config of "
                          f"{source!r} ({exc.__class__.__name__}); pass the base model (--model)") from None
    config = getattr(config, "text_config", None) or config
    return int(config.num_hidden_layers)
