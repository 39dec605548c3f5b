"""The ``serac`` method: builds a memory pack (facts and a calibrated scope classifier) instead of a weight delta."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from ...facts import Fact
from ...packs.base_model import describe_base
from ...packs.memory.encoder import ENCODER_PACKAGE, SentenceEncoder
from ...packs.memory.pack import MemoryPack
from ...packs.memory.scope import calibrate_facts
from ..base import EditMethod, register_method
from .config import SERACConfig


@register_method
class SERAC(EditMethod):
    name = "serac"
    config_class = SERACConfig
    config: SERACConfig
    summary = "a memory (facts + scope classifier), no weights: see Memory packs"
    needs_packages = (ENCODER_PACKAGE,)
    routes_text = True

    def compute(self, model, tokenizer, facts: Sequence[Fact], spec, state=None):
        raise TypeError("serac makes memory packs, not weight deltas: use editpack.edit(..., method='serac')")

    def build_pack(self, model, tokenizer, facts, spec, *, name, version, parents, state=None,
                   encoder: SentenceEncoder | None = None) -> MemoryPack:
        cfg = self.config
        encoder = encoder or SentenceEncoder()
        keys = encoder.encode([f.text for f in facts])
        threshold = cfg.threshold if cfg.threshold is not None else calibrate_facts(encoder, facts, keys, cfg)
        base = replace(describe_base(model, []), embedding=None)  # no weights touched: identity only
        return MemoryPack(name=name, version=version, method=self.name, hyperparameters=cfg.recorded(),
                          facts=list(facts), base=base, keys=keys, threshold=threshold, parents=parents)
