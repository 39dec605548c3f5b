"""MEMIT hyper-parameters: ROME's (value optimisation, statistics, context prefixes) plus the update's weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import at_least, positive
from ..rome.config import ROMEConfig


@dataclass
class MEMITConfig(ROMEConfig):
    bounds: ClassVar[dict] = {"mom2_update_weight": (positive,), "facts_per_batch": (at_least(1),)}

    # ``layers``: the MLP output projections that share the update (``None``: the spec's ``memit`` default);
    # the target hidden state is optimised at the output of the last of them.
    #: Weight λ of the preserved keys' second moment against the new keys: ΔW = R Kᵀ (λC + K Kᵀ)⁻¹.
    mom2_update_weight: float = 15000.0
    #: MEMIT's own setting (ROME's is 20); ``optimize_dtype`` defaults to "auto" as for ROME.
    v_num_grad_steps: int = 25
    #: How many facts' δ are optimised together in one batch (each with its own loss and early stop). More is
    #: faster until the device is busy; memory grows with it (activations of ``facts × prompts`` sequences).
    facts_per_batch: int = 16

    def validate(self) -> None:
        super().validate()
        if self.facts_per_batch < 1:
            raise ValueError(f"facts_per_batch must be at least 1, not {self.facts_per_batch}")
