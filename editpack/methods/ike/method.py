"""The ``ike`` method (IKE, Zheng et al. 2023): a memory pack like ``serac``'s, whose in-scope prompts are answered
with in-context demonstrations of the pack's facts nearest to the matched one (``editpack.packs.memory.routes``)."""

from __future__ import annotations

from ..base import register_method
from ..serac.method import SERAC
from .config import IKEConfig


@register_method
class IKE(SERAC):
    name = "ike"
    config_class = IKEConfig
    summary = "a memory pack answered in context with demonstrations of its nearest facts (IKE)"
    tiny_settings = dict(demonstrations=1)
