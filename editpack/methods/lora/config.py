"""LoRA baseline hyper-parameters (EasyEdit's LoRA defaults: rank 8, alpha 32, lr 5e-3)."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig


@dataclass
class LoRAConfig(MethodConfig):
    #: Layers whose MLP output projection gets a LoRA adapter; ``None`` takes the spec's ``lora`` default.
    layers: list[int] | None = None
    rank: int = 8
    alpha: float = 32.0
    lr: float = 5e-3
    num_steps: int = 50
    batch_size: int = 32
    early_stop_loss: float = 1e-2
    seed: int = 0
