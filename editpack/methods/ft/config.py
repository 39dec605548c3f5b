"""FT-M hyper-parameters (EasyEdit's FT-M defaults: Adam, lr 5e-4, 25 steps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import MethodConfig, at_least, positive


@dataclass
class FTConfig(MethodConfig):
    bounds: ClassVar[dict] = {"lr": (positive,), "num_steps": (at_least(1),), "batch_size": (at_least(1),), "early_stop_loss": (at_least(0),)}

    #: Layers whose MLP output projection is fine-tuned; ``None`` takes the spec's ``ft`` default.
    layers: list[int] | None = None
    lr: float = 5e-4
    num_steps: int = 25
    batch_size: int = 32
    early_stop_loss: float = 1e-2
    seed: int = 0
