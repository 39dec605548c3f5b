"""AlphaEdit hyper-parameters: MEMIT's plus the null-space threshold and the ridge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import at_least, positive
from ..memit.config import MEMITConfig


@dataclass
class AlphaEditConfig(MEMITConfig):
    bounds: ClassVar[dict] = {"nullspace_threshold": (positive,), "l2": (at_least(0),)}

    #: Eigen-directions of the preserved keys' second moment C with eigenvalue below this span the null space
    #: that updates are projected onto (the paper's 2e-2).
    nullspace_threshold: float = 2e-2
    #: Ridge of the projected system: ΔW = R Kᵀ P (P(K Kᵀ + K_p K_pᵀ) + α I)⁻¹ (the paper's L2).
    l2: float = 10.0
