"""SERAC-style memory packs: the scope classifier's calibration and the route for in-scope prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...packs.memory.encoder import ENCODER_ID
from ...packs.memory.routes import DEMO_TEMPLATE, IKE_DEMONSTRATIONS, ROUTES
from ...packs.memory.scope import Scope
from ..base import MethodConfig, between


@dataclass
class SERACConfig(MethodConfig, Scope):
    """The scope settings (``editpack.packs.memory.Scope``: threshold and its calibration, subject required), the route
    for in-scope prompts, the template and the encoder."""

    bounds: ClassVar[dict] = {name: (between(-1, 1),) for name in ("threshold", "min_threshold", "default_threshold")}

    #: ``"answer"``: the stored target starts the answer; ``"context"``: fact in context, the model answers;
    #: ``"ike"``: in-context demonstrations from the pack's nearest facts before the fact (IKE). ``answer`` is the
    #: default: with the relation check (``relation_margin``) it was the only route measured that answers the
    #: edit prompts, generalises to their paraphrases and keeps unrelated prompts at once
    #: (docs/results/memory-packs.md).
    route: str = "answer"
    template: str = DEMO_TEMPLATE
    encoder: str = ENCODER_ID
    #: With ``route="ike"``: how many of the pack's other facts demonstrate (each as copy, update, retain).
    demonstrations: int = IKE_DEMONSTRATIONS
    #: Context-aware decoding (Shi et al. 2023) for in-scope prompts: each answer token is chosen from
    #: ``(1 + contrast) * log p(y | context, prompt) - contrast * log p(y | the same without the new fact)``
    #: (``editpack.model.generation.Contrast``; ``editpack.packs.memory.routes.rewritten`` gives both texts), by generation and
    #: teacher-forced scoring alike, so what the new fact says wins over the model's prior. 0 (the default here,
    #: and what packs made before the setting read) decodes in context as it is.
    contrast: float = 0.0
    #: With a contrast: tokens whose in-context probability is under this fraction of the likeliest token's are
    #: never chosen (contrastive decoding's adaptive plausibility, Li et al. 2023), so the contrast cannot pick a word
    #: the context merely mentions (another demonstrated fact's answer) over the one it supports.
    plausibility: float = 0.1

    def validate(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, not {self.route!r}")
        if self.demonstrations < 0:
            raise ValueError(f"demonstrations must be ≥ 0, not {self.demonstrations}")
        if not 0 <= self.contrast <= 10:  # also refuses NaN
            raise ValueError(f"contrast must be between 0 and 10, not {self.contrast}")
        if not 0 <= self.plausibility < 1:
            raise ValueError(f"plausibility must be at least 0 and under 1, not {self.plausibility}")
        if "{statement}" not in self.template or "{prompt}" not in self.template:
            raise ValueError("template must contain {statement} and {prompt}")
        if self.relation_margin is not None and not -2 <= self.relation_margin <= 2:
            raise ValueError(f"relation_margin must be between -2 and 2 (a difference of cosines) or None, "
                             f"not {self.relation_margin}")
        if not 0 <= self.max_false_positive_rate <= 1:
            raise ValueError(f"max_false_positive_rate must be between 0 and 1, not {self.max_false_positive_rate}")
