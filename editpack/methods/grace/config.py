"""GRACE hyper-parameters: where the codebook sits, how its values are optimised, how wide its radii start."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..locate.keys import POSITIONS
from ..locate.values import ValueOptimization


@dataclass
class GRACEConfig(ValueOptimization):
    #: The one layer whose MLP output projection the codebook wraps; ``None``: the architecture's ``critical``
    #: layer for subject keys, its ``late`` layer for prompt keys.
    layers: list[int] | None = None
    #: The token whose activation is the key and whose output is replaced: ``subject`` (the subject's last token,
    #: as ROME's key; default) or ``prompt`` (the prompt's last token, as the GRACE paper: the key holds subject
    #: and relation). Measured on SmolLM2, prompt keys at the late layer answered no more paraphrases than the
    #: unedited model and subject keys at the critical layer most of them, both leaving the neighbourhood as it
    #: was (docs/results/lifelong.md); subject keys also answer the subject's other relations from the codebook,
    #: as ROME does.
    key_position: str = "subject"
    #: Value optimisation as ROME's (``ValueOptimization``), with fewer context prefixes (3 prompts, not 11):
    #: a lifelong stream of edits stays cheap.
    v_num_grad_steps: int = 25
    context_template_lengths: list[list[int]] = field(default_factory=lambda: [[5, 2]])
    #: A new entry's deferral radius: ``radius_scale`` × the farthest its key moves when the prompt is preceded
    #: by the context prefixes (the spread of the same question in other contexts).
    radius_scale: float = 1.0
    #: ... and, with ``unrelated_samples`` (count and tokens of text the model samples; ``None`` turns the cap
    #: off), at most ``radius_margin`` of the distance to the nearest module input at any position of that text.
    #: Without the cap, keys near the first token's attention-sink activation matched other prompts' first token
    #: and changed many neighbourhood continuations; with it none changed (docs/results/lifelong.md).
    radius_margin: float = 0.5
    unrelated_samples: list[int] | None = field(default_factory=lambda: [32, 24])
    #: Values are optimised this many facts at a time (memory grows with it).
    facts_per_batch: int = 16

    def validate(self) -> None:
        if self.layers is not None and len(self.layers) != 1:
            raise ValueError(f"GRACE wraps one layer; layers={self.layers} names {len(self.layers)}")
        if self.key_position not in POSITIONS:
            raise ValueError(f"key_position must be one of {', '.join(POSITIONS)}, not {self.key_position!r}")
        if self.radius_scale <= 0 or not 0 < self.radius_margin <= 1:
            raise ValueError(f"radius_scale must be positive and radius_margin in (0, 1], not {self.radius_scale}, "
                             f"{self.radius_margin}")
        if self.unrelated_samples is not None and (
                len(self.unrelated_samples) != 2 or any(int(v) != v or v < 1 for v in self.unrelated_samples)):
            raise ValueError(f"unrelated_samples must be [count, tokens], two positive integers, or None, not "
                             f"{self.unrelated_samples!r}")
        if self.facts_per_batch < 1:
            raise ValueError(f"facts_per_batch must be at least 1, not {self.facts_per_batch}")
