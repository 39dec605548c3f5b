"""IKE's settings: a SERAC memory pack's, with the ``ike`` route and its contrast."""

from __future__ import annotations

from dataclasses import dataclass

from ..serac.config import SERACConfig


@dataclass
class IKEConfig(SERACConfig):
    """IKE: a memory pack whose in-scope prompts get in-context demonstrations (``route="ike"``), decoded with a
    context-aware contrast of 0.5 and no plausibility floor unless told otherwise (``contrast=0``: IKE as
    published)."""

    route: str = "ike"
    #: Chosen on records kept for tuning, against 0 and 1 (docs/results/memory-packs.md).
    contrast: float = 0.5
    #: No floor under IKE's contrast: a floor gave targets the context finds unlikely but the new fact alone
    #: supports probability zero, and measured without one IKE generalised further with as few probes answered
    #: wrongly (docs/results/memory-packs.md).
    plausibility: float = 0.0
