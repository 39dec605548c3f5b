"""MEND's settings: the editor to edit with, and how a new editor is shaped and trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import MethodConfig, at_least
from ..targets import check_key_positions


@dataclass
class MENDConfig(MethodConfig):
    bounds: ClassVar[dict] = {"locality_prompts": (at_least(1),)}

    #: The trained editor: a directory or ``user/name@version`` (``editpack train mend`` makes one). A pack
    #: records it as ``name@version``, with its content hash in ``editor_content``.
    editor: str | None = None
    #: The editor's content hash (``sha256:…``); when given, an editor with other content is refused.
    editor_content: str | None = None
    #: Edit steps: each takes the edit loss's gradient factors with the previous steps' edit added and maps them
    #: through the editor; the edit is the sum (rank ≤ steps × tokens × facts per layer). MEND takes one; an
    #: editor at the middle layers, whose single step moves the answer too little, reaches further with more, at
    #: the cost of one forward and backward pass each (docs/results/mend.md). ``None``: the editor's own (set when
    #: it is trained: 2 for new editors, ``--set steps=N`` otherwise; 1 for editors trained before steps were
    #: recorded), which its held-out scores are taken with. A pack records the number it was made with.
    steps: int | None = None
    # ------------------------------------------------------------------ training a new editor
    #: Layers whose MLP output projections the editor is trained for; ``None``: the architecture's ``run`` (the
    #: middle layers where MEMIT edits; MEND's own editors took the ``tail``, ``--set "layers=[…]"``).
    layers: list[int] | None = None
    #: Width of the editor network's hidden layer (one network per module shape, layer-specific scale/shift).
    rank: int = 512
    #: Initial per-layer edit step (learned); 1e-3 for the middle layers (MEND's own: 1e-4).
    edit_lr: float = 1e-3
    #: Weight of the edit loss (NLL of the new answer after the edit prompt and its paraphrase) against the
    #: locality loss (KL from the unedited model on unrelated prompts), as MEND's c_edit; lower keeps more of
    #: the neighbourhood and edits less (docs/results/mend.md).
    edit_weight: float = 0.05
    #: Training steps over which the inputs' normalisation statistics are gathered (then frozen).
    norm_steps: int = 100
    #: Where the locality KL is taken on each neighbourhood prompt: ``"answer"``, the last position (where the
    #: prompt's answer is predicted: CounterFact's neighbourhood prompts share the edit's relation and old answer,
    #: so this is where an edit that learnt the relation instead of the subject shows), or ``"all"`` positions
    #: (the first editors averaged over all positions, which dilutes that signal by the prompt's length).
    locality_at: str = "answer"
    #: Neighbourhood prompts per edit in the locality loss (CounterFact records have 10).
    locality_prompts: int = 3
    #: Which tokens' gradient factors ``[u_t, δ_t]`` the editor sees: ``"subject"``, each prompt's subject-last
    #: token only (ROME's key: one row per fact and step; the loss reaches it through the attention of later
    #: layers, so not at the model's last layer unless the subject ends the prompt); ``"target"``, the positions
    #: that predict the new answer's tokens (MEND's own); or ``"all"``, every position with a gradient, as the
    #: authors' code does. An editor keeps the positions it was trained with; edits with it use them. The subject
    #: at the middle layers with two steps is the recipe that met every target measured on SmolLM2
    #: (docs/results/mend.md); late in the network the answer positions carry the relation more than the subject,
    #: and edits keyed there move the relation's other subjects too.
    positions: str = "subject"

    def validate(self) -> None:
        if self.rank < 1 or self.edit_lr <= 0 or self.edit_weight <= 0 or self.norm_steps < 1:
            raise ValueError("rank and norm_steps must be ≥ 1; edit_lr and edit_weight positive")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, not {self.steps}")
        if self.locality_at not in ("answer", "all"):
            raise ValueError(f"locality_at must be 'answer' or 'all', not {self.locality_at!r}")
        if self.locality_prompts < 1:
            raise ValueError("locality_prompts must be ≥ 1")
        check_key_positions(self.positions)

    def recorded(self) -> dict:
        values = super().recorded()
        for key in ("layers", "rank", "edit_lr", "edit_weight", "norm_steps", "locality_at", "locality_prompts",
                    "positions"):
            values.pop(key)
        return values  # training settings are the editor's record; the editor fixes the modules
