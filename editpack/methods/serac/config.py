"""SERAC-style memory packs: the scope classifier's calibration and the route for in-scope prompts."""

from __future__ import annotations

from dataclasses import dataclass

from ...memory import DEMO_TEMPLATE, ENCODER_ID, IKE_DEMONSTRATIONS, ROUTES, Scope
from ..base import MethodConfig


@dataclass
class SERACConfig(MethodConfig, Scope):
    """The scope settings (``editpack.memory.Scope``: threshold and its calibration, subject required), the route
    for in-scope prompts, the template and the encoder."""

    #: ``"answer"``: the stored target starts the answer; ``"context"``: fact in context, the model answers;
    #: ``"ike"``: in-context demonstrations from the pack's nearest facts before the fact (IKE). ``answer`` is the
    #: default because, with the relation check (``relation_margin``), it was the only route to answer ≥ 95 % of
    #: edit prompts, ≥ 85 % of paraphrases and keep ≥ 98 % of unrelated prompts (``bench/memory_scope.py``, SmolLM2:
    #: 100 / 92 / 100 % generate_match), answering 4.0 % of same-subject, other-relation probes with the stored
    #: target (``context``: 80 / 55 / 100 % and 2.7 %; ``ike``: 97 / 57 / 100 % and 1.7 %; without the relation
    #: check ``answer`` wrongly answers 51 %).
    route: str = "answer"
    template: str = DEMO_TEMPLATE
    encoder: str = ENCODER_ID
    #: With ``route="ike"``: how many of the pack's other facts demonstrate (each as copy, update, retain).
    demonstrations: int = IKE_DEMONSTRATIONS

    def validate(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, not {self.route!r}")
        if self.demonstrations < 0:
            raise ValueError(f"demonstrations must be ≥ 0, not {self.demonstrations}")
        if "{statement}" not in self.template or "{prompt}" not in self.template:
            raise ValueError("template must contain {statement} and {prompt}")
        if self.relation_margin is not None and not -2 <= self.relation_margin <= 2:
            raise ValueError(f"relation_margin must be between -2 and 2 (a difference of cosines) or None, "
                             f"not {self.relation_margin}")
        if not 0 <= self.max_false_positive_rate <= 1:
            raise ValueError(f"max_false_positive_rate must be between 0 and 1, not {self.max_false_positive_rate}")


@dataclass
class IKEConfig(SERACConfig):
    """IKE: a memory pack whose in-scope prompts get in-context demonstrations (``route="ike"``)."""

    route: str = "ike"
