"""LoRA fine-tuning baseline: PEFT LoRA layers on MLP output projections, trained on the new targets."""

from .config import LoRAConfig
from .method import LoRA

__all__ = ["LoRA", "LoRAConfig"]
