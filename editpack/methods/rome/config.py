"""ROME hyper-parameters (defaults follow the paper's GPT-2 XL / EasyEdit Llama settings)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..base import at_least, positive
from ..locate.values import ValueOptimization


@dataclass
class ROMEConfig(ValueOptimization):
    bounds: ClassVar[dict] = {"stats_tokens": (at_least(1),), "mom2_ridge": (at_least(0),),
                              "stats_tolerance": (positive,)}

    #: Layers whose MLP output projection is edited; ``None`` takes the architecture spec's default.
    layers: list[int] | None = None
    #: Key statistics: ``mom2_adjustment=False`` uses C = I. ``stats_corpus=None`` samples text from the model.
    #: ``stats_tokens=None``: :func:`editpack.model.stats.default_tokens` (fewer when sampled: sampling is slow).
    mom2_adjustment: bool = True
    #: A path at run time; a pack records only the file's name and its sha256 (``stats_corpus_sha256``), which
    #: finds the cached statistics again when the pack is extended on a machine without the file.
    stats_corpus: str | None = None
    stats_corpus_sha256: str | None = None
    stats_tokens: int | None = None
    #: Read keys until a stopping rule says they are enough (the tolerance of ``editpack stats compute --tokens
    #: auto``; ``stats_tokens`` is then the most read); ``None``: exactly ``stats_tokens``.
    stats_tolerance: float | None = None
    #: A statistics artifact to edit with (a directory or ``user/name@version``, as ``editpack stats compute``
    #: writes it): its corpus and token count become the edit's, its fingerprints are checked against the model,
    #: and the pack records its reference and content hash (``stats_content``) instead of a path.
    stats: str | None = None
    stats_content: str | None = None
    #: Ridge added to C (times its mean diagonal) before solving, for numerical safety.
    mom2_ridge: float = 1e-5

    def recorded(self) -> dict:
        values = super().recorded()
        if self.stats_corpus:
            values["stats_corpus"] = Path(self.stats_corpus).name
        return values
