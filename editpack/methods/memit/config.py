"""MEMIT hyper-parameters: ROME's (value optimisation, statistics, context prefixes) plus the update's weight."""

from __future__ import annotations

from dataclasses import dataclass

from ..rome.config import ROMEConfig


@dataclass
class MEMITConfig(ROMEConfig):
    # ``layers``: the MLP output projections that share the update (``None``: the spec's ``memit`` default);
    # the target hidden state is optimised at the output of the last of them.
    #: Weight λ of the preserved keys' second moment against the new keys: ΔW = R Kᵀ (λC + K Kᵀ)⁻¹.
    mom2_update_weight: float = 15000.0
    #: MEMIT's own setting (ROME's is 20); ``optimize_dtype`` defaults to "auto" as for ROME.
    v_num_grad_steps: int = 25
