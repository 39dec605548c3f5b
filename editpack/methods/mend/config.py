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
    #: through the editor; the edit is the sum (rank ≤ steps × tokens × facts per layer). MEND takes one; more
    #: give an editor whose single step moves the answer too little (one trained for the middle layers) more
    #: reach, at the cost of one forward and backward pass each. On SmolLM2 the middle-layer editor (below) with
    #: 5 steps read prob_compare 96 / 72 / 60 on the first 100 CounterFact edit records (unedited neighbourhood
    #: 66; one step: 69 / 51 / 64), while its neighbours' greedy continuations changed more (README).
    #: ``None``: the editor's own (set when it is trained, e.g. ``editpack train mend --set steps=2``, and used for
    #: its held-out scores; 1 for editors trained without it). A pack records the number it was made with.
    steps: int | None = None
    # ------------------------------------------------------------------ training a new editor
    #: Layers whose MLP output projections the editor is trained for; ``None``: the architecture's ``tail``.
    #: On SmolLM2 the middle layers (3-7, ``positions="all"``) kept CounterFact's neighbourhood but edited 65-69 %
    #: (prob_compare, first 100 edit records) after 600-900 steps, also with the initial step or Adam's rate ten
    #: times larger.
    layers: list[int] | None = None
    #: Width of the editor network's hidden layer (one network per module shape, layer-specific scale/shift).
    rank: int = 512
    #: Initial per-layer edit step (learned).
    edit_lr: float = 1e-4
    #: Weight of the edit loss (NLL of the new answer after the edit prompt and its paraphrase) against the
    #: locality loss (KL from the unedited model on unrelated prompts), as MEND's c_edit. On SmolLM2 (900 steps,
    #: the first 100 CounterFact edit records) 0.05 with 3 neighbourhood prompts moved the neighbourhood 12
    #: points (prob_compare efficacy 81 %), 0.1 with 1 prompt 19 points (efficacy 90 %).
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
    #: Which tokens' gradient factors ``[u_t, δ_t]`` the editor sees: ``"target"``, the positions that predict
    #: the new answer's tokens; ``"all"``, every position with a gradient (the prompt's get theirs through
    #: attention, the subject's among them), as the authors' code does; or ``"subject"``, each prompt's
    #: subject-last token only (ROME's key: one row per fact and step; the loss reaches it through the attention
    #: of later layers, so not at the model's last layer unless the subject ends the prompt). An editor keeps the
    #: positions it was trained with; edits with it use them. On SmolLM2 (900 steps, the first 100 CounterFact
    #: edit records, prob_compare; unedited neighbourhood 66 %) at the last four layers ``"all"`` edited more and
    #: kept less (87 / 80 / 51 %) than ``"target"`` (81 / 73 / 54 %); at layers 3-7 with ``edit_lr=1e-3``,
    #: ``"subject"`` with ``steps=2`` read 94 / 85 / 65 % (``"all"`` with 5 steps: 96 / 72 / 60 %).
    positions: str = "target"

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
