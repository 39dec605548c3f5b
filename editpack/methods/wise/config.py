"""WISE hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import MethodConfig, at_least, each


@dataclass
class WISEConfig(MethodConfig):
    bounds: ClassVar[dict] = {"alpha": (at_least(0),), "beta": (at_least(0),), "gamma": (at_least(0),), "act_weight": (at_least(0),),
                              "unrelated_samples": (each(at_least(1)),)}

    #: The one layer whose MLP output projection gets a side memory; ``None``: the architecture's ``late`` layer.
    layers: list[int] | None = None
    #: Optimisation of the side delta: Adam steps per shard and their learning rate.
    n_iter: int = 60
    lr: float = 1e-2
    #: Knowledge sharding: a round's facts are split into shards of at most this many facts; each shard trains a
    #: random ``mask_ratio`` share of the side memory's entries (its own mask), and the shards are merged
    #: (TIES: signs elected, agreeing entries averaged).
    facts_per_shard: int = 50
    mask_ratio: float = 0.2
    #: Routing margins, as fractions of the layer's mean output norm on unrelated text: the activation difference
    #: ‖ΔW x‖ should stay below ``alpha`` on unrelated text, exceed ``beta`` where an edit is answered, and the
    #: two be ``gamma`` apart (WISE's three hinge terms); ``act_weight`` weighs them against the edit loss.
    alpha: float = 0.02
    beta: float = 0.4
    gamma: float = 0.3
    act_weight: float = 1.0
    #: Unrelated text for the routing margin and threshold: texts the model samples (count, tokens), with ``seed``.
    unrelated_samples: list[int] | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.layers is not None and len(self.layers) != 1:
            raise ValueError(f"WISE edits one layer; layers={self.layers} names {len(self.layers)}")
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in (0, 1], not {self.mask_ratio}")
        if self.n_iter < 1 or self.facts_per_shard < 1 or self.lr <= 0:
            raise ValueError("n_iter and facts_per_shard must be at least 1 and lr positive")
