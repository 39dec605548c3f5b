"""ROME hyper-parameters (defaults follow the paper's GPT-2 XL / EasyEdit Llama settings)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..base import at_least
from ..locate.values import ValueOptimization


@dataclass
class ROMEConfig(ValueOptimization):
    bounds: ClassVar[dict] = {"stats_tokens": (at_least(1),), "mom2_ridge": (at_least(0),)}

    #: Layers whose MLP output projection is edited; ``None`` takes the architecture spec's default.
    layers: list[int] | None = None
    #: Key statistics: ``mom2_adjustment=False`` uses C = I. ``stats_corpus=None`` samples text from the model.
    #: ``stats_tokens=None`` means 100,000 tokens of a corpus, or 20,000 sampled tokens (sampling is slow).
    mom2_adjustment: bool = True
    #: A path at run time; a pack records only the file's name and its sha256 (``stats_corpus_sha256``), which
    #: finds the cached statistics again when the pack is extended on a machine without the file.
    stats_corpus: str | None = None
    stats_corpus_sha256: str | None = None
    stats_tokens: int | None = None
    #: Ridge added to C (times its mean diagonal) before solving, for numerical safety.
    mom2_ridge: float = 1e-5

    def recorded(self) -> dict:
        values = super().recorded()
        if self.stats_corpus:
            values["stats_corpus"] = Path(self.stats_corpus).name
        return values
