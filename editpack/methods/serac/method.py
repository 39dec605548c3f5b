"""The ``serac`` method: builds a memory pack instead of computing a weight delta."""

from __future__ import annotations

from typing import Sequence

from ...facts import Fact
from ...memory import SERACConfig, build_memory_pack
from ..base import EditMethod, register_method


@register_method
class SERAC(EditMethod):
    name = "serac"
    config_class = SERACConfig
    config: SERACConfig
    kind = "memory"

    def compute(self, model, tokenizer, facts: Sequence[Fact], spec, state=None):
        raise TypeError("serac makes memory packs, not weight deltas: use editpack.edit(..., method='serac')")

    def build_pack(self, model, tokenizer, facts, *, name, version, base, parents, state=None):
        """The pack itself (a memory pack); :func:`editpack.edit` calls this instead of ``compute``."""
        return build_memory_pack(model, tokenizer, facts, self.config, name=name, version=version, base=base,
                                 parents=parents, state=state)
