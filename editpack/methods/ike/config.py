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
    #: Chosen on records 51–100 of CounterFact's original records (SmolLM2, greedy, paraphrases answered with the
    #: new target): 0 / 0.5 / 1 → 71 / 87 / 87 %, edit prompts 100 % each (see the README's Memory packs).
    contrast: float = 0.5
    #: No floor under IKE's contrast: measured with ``contrast=0.5`` (``bench/memory_scope.py --plausibility``,
    #: 2026-12-05), 0 against 0.1 read generate_match 100 / 87 / 99.8 against 100 / 86 / 99.8 and prob_compare
    #: generalization 98 against 90 % on CounterFact's true paraphrases (first 50 ROME-format records), 99 / 71 / 100
    #: against 99 / 70 / 100 and 93 against 75 % on the first 100 flattened records, probes answered wrongly 4 and
    #: 2.3 % either way: the floor gave targets the context finds unlikely but the fact alone supports probability 0.
    plausibility: float = 0.0
