"""UltraEdit hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig
from ..targets import check_key_positions


@dataclass
class UltraEditConfig(MethodConfig):
    #: Layers whose MLP output projection is edited; ``None``: the architecture's ``tail`` layers.
    layers: list[int] | None = None
    #: Step size: each edited token's value shift is ``-lr · ‖k̂‖² · ĝ`` (k̂, ĝ the normalised key and gradient).
    lr: float = 1e-4
    #: The ridge added to ``K Kᵀ`` in the closed-form update (UltraEdit: the identity).
    ridge: float = 1.0
    #: Added to the running variance before normalising.
    norm_epsilon: float = 1e-8
    #: Rows of the update: the ``"target"`` positions that predict the new answer (the authors' ``token: ans``), or
    #: ``"all"`` positions of each prompt and target (``token: mask``); every setting measured trades efficacy
    #: for neighbourhood along one line (docs/results/lifelong.md).
    #: ``"subject"`` (each prompt's subject-last token, as MEND's) is accepted but not measured for UltraEdit.
    positions: str = "target"
    #: Facts per forward/backward pass (memory grows with it; the update is solved over all of them at once).
    facts_per_batch: int = 32

    def validate(self) -> None:
        if self.lr <= 0 or self.ridge <= 0 or self.norm_epsilon <= 0:
            raise ValueError("lr, ridge and norm_epsilon must be positive")
        check_key_positions(self.positions)
        if self.facts_per_batch < 1:
            raise ValueError(f"facts_per_batch must be at least 1, not {self.facts_per_batch}")
