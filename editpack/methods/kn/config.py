"""KN hyper-parameters (Dai et al. 2022; the update rule of the knowledge-neurons reference code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import MethodConfig, positive


@dataclass
class KNConfig(MethodConfig):
    bounds: ClassVar[dict] = {"edit_scale": (positive,)}

    #: Layers whose MLP intermediate neurons are attributed; ``None``: every layer (as in the paper).
    layers: list[int] | None = None
    #: Riemann steps of the integrated-gradients path from zero to the neuron activations.
    ig_steps: int = 20
    #: Layers whose paths share one batched pass (``ig_steps`` rows each): more is faster, and needs a KV cache of
    #: the prompt for ``ig_steps × layers_per_pass`` rows.
    layers_per_pass: int = 10
    #: A neuron is kept for a prompt when its attribution exceeds ``threshold`` × that prompt's largest.
    threshold: float = 0.2
    #: With several prompts (the fact's prompt and paraphrases, at most ``max_prompts``), a neuron is kept when it
    #: is kept for at least this share of them (the paper's refinement).
    share: float = 0.5
    max_prompts: int = 3
    #: At most this many neurons per fact (the strongest).
    max_neurons: int = 20
    #: Each kept neuron's value vector (its column of the MLP output projection) moves by
    #: ``edit_scale × (u_new − u_old)``, u the output embedding of the new answer's and the current answer's first
    #: token (the reference code's 2).
    edit_scale: float = 2.0

    def validate(self) -> None:
        if self.ig_steps < 1 or self.max_prompts < 1 or self.max_neurons < 1 or self.layers_per_pass < 1:
            raise ValueError("ig_steps, max_prompts, max_neurons and layers_per_pass must be at least 1")
        if not 0 < self.threshold <= 1 or not 0 < self.share <= 1:
            raise ValueError("threshold and share must be in (0, 1]")
