"""Mixture-of-Experts blocks for locate-then-edit methods (docs/concepts/moe.md): where the subject's last token
is routed, each routed expert's key (its output projection's input there) and the expert slices an update
changes.

transformers keeps a block's experts as stacked parameters (``gate_up_proj``, ``down_proj``; one leading expert
dimension, ``is_transposed`` where stored ``(experts, in, out)``) in a module called as
``experts(hidden, top_k_index, top_k_weights)``; the architecture file names that module (``experts.module``).
The keys are computed from those parameters with the module's own gate (``_apply_gate``, or ``act_fn`` for
experts without one), so any family built on transformers' experts interface is read the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ...facts import Fact
from ...model.arch import ArchSpec
from ...model.experts import down_weight, expert_inputs, experts_module
from ...model.generation import model_device
from ...model.nethook import Trace
from .keys import encode, lookups

__all__ = ["ExpertKeys", "Route", "down_weight", "expert_inputs", "experts_module", "fact_expert_keys", "routes"]


@dataclass
class Route:
    """Where one token went: its input to the experts module, the experts chosen and their router weights."""

    hidden: torch.Tensor  # (hidden,)
    experts: list[int]
    weights: list[float]


@torch.no_grad()
def routes(model, tokenizer, spec: ArchSpec, layer: int, texts: Sequence[str], idxs: Sequence[int]) -> list[Route]:
    """Where the token at ``idxs[i]`` of ``texts[i]`` goes in ``layer``'s block: one :class:`Route` per text."""
    batch = encode(tokenizer, texts, model_device(model))
    width = batch["input_ids"].shape[1]
    with Trace(model, spec.experts_name(layer), retain_args=True, retain_output=False, stop=True) as trace:
        model(**batch)
    hidden, index, weights = trace.args[:3]
    rows = [i * width + at for i, at in enumerate(idxs)]
    hidden, index, weights = hidden.reshape(-1, hidden.shape[-1]), index.reshape(-1, index.shape[-1]), \
        weights.reshape(-1, weights.shape[-1])
    return [Route(hidden[r].float(), [int(e) for e in index[r]], [float(w) for w in weights[r]]) for r in rows]


@dataclass
class ExpertKeys:
    """One fact at one MoE layer: the experts its subject's last token goes to (bare prompt), their router
    weights, each one's key averaged over the context prefixes, and its input at the bare prompt."""

    experts: list[int]
    weights: list[float]
    keys: dict[int, torch.Tensor]  # expert -> (intermediate,)
    current: dict[int, torch.Tensor]  # expert -> (intermediate,), at the bare prompt


def fact_expert_keys(model, tokenizer, spec: ArchSpec, layer: int, facts: Sequence[Fact],
                     templates: Sequence[str]) -> list[ExpertKeys]:
    """:class:`ExpertKeys` of each fact. A context prefix may route the token elsewhere; the key of an edited
    expert is its input for every prefix all the same, so the update answers wherever it is consulted."""
    experts = experts_module(model, spec, layer)
    out = []
    for fact in facts:
        # the bare prompt first, then the prompt after each context prefix: one forward
        texts, idxs = lookups(tokenizer, [fact.prompt] + [template.format(fact.prompt) for template in templates], fact)
        found = routes(model, tokenizer, spec, layer, texts, idxs)
        bare, hidden = found[0], torch.stack([r.hidden for r in found[1:]])
        keys = {e: expert_inputs(experts, hidden, e).mean(0) for e in bare.experts}
        current = {e: expert_inputs(experts, bare.hidden[None], e)[0] for e in bare.experts}
        out.append(ExpertKeys(bare.experts, bare.weights, keys, current))
    return out
