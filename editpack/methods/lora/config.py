"""LoRA baseline hyper-parameters (EasyEdit's LoRA defaults: rank 8, alpha 32, lr 5e-3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import MethodConfig, at_least, positive


@dataclass
class LoRAConfig(MethodConfig):
    bounds: ClassVar[dict] = {"rank": (at_least(1),), "alpha": (positive,), "lr": (positive,), "num_steps": (at_least(1),),
                              "batch_size": (at_least(1),), "early_stop_loss": (at_least(0),)}

    #: Layers whose MLP output projection gets a LoRA adapter; ``None`` takes the spec's ``lora`` default.
    layers: list[int] | None = None
    rank: int = 8
    alpha: float = 32.0
    lr: float = 5e-3
    num_steps: int = 50
    batch_size: int = 32
    early_stop_loss: float = 1e-2
    seed: int = 0
