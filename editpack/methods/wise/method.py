"""WISE (Wang et al. 2024): edits written into a side memory of one layer, behind a router.

The side memory is ``W + ΔW`` for the ``late`` layer's MLP output projection ``W``; :class:`SideMemoryPack`
applies it where the activation difference ``‖ΔW x‖`` exceeds the pack's threshold. One round of edits:

1. **Knowledge sharding**: the facts are split into shards (``facts_per_shard``); each shard trains its own
   random ``mask_ratio`` share of ``ΔW``'s entries, starting from the side memory as the earlier rounds left it,
   with Adam for ``n_iter`` steps on the edit loss (each fact's mean NLL of its new target, the side memory on)
   plus WISE's routing hinges: ``‖ΔW x‖`` below ``alpha`` on unrelated text, above ``beta`` at the positions that
   answer an edit, and ``gamma`` between the two (margins relative to the layer's output norm on that text).
2. **Merging**: the shards' changes are merged TIES-style (the sign of their sum elected per entry; entries that
   agree averaged over the shards that moved them) and added to the side memory.
3. **Threshold**: halfway between the largest activation difference on unrelated text and the smallest at the
   positions answering any fact edited so far (when they overlap, the unrelated side wins: locality first).

Unrelated text is sampled from the model itself (``unrelated_samples``: count and length; seeded), plus the facts'
own prompts asked about another fact's subject (same relation, other subject: in-distribution negatives that need
no outside data). The round's
result is a :class:`~editpack.packs.side_memory.SideMemoryPack`; :func:`editpack.extend` grows it round by round.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...errors import EditpackError
from ...facts import Fact, kept_indices
from ...model.arch import ArchSpec
from ...model.generation import model_device
from ...model.nethook import Trace, first_tensor, replace_first
from ...packs.base_model import describe_base
from ...packs.delta import LowRankDelta, WeightDelta
from ...packs.side_memory import SideMemoryPack
from ..base import EditMethod, register_method
from ..locate.context import unrelated_texts
from ..locate.keys import inputs_everywhere
from ..locate.model_state import frozen
from ..targets import target_batch
from .config import WISEConfig

UNRELATED = (32, 24)  # texts, tokens each (``unrelated_samples``)


def swapped_prompts(facts: Sequence[Fact], count: int, seed: int) -> list[str]:
    """Up to ``count`` prompts of one fact asked about another fact's subject (none that is itself an edit)."""
    if len(facts) < 2:
        return []
    edits = {f.text for f in facts}
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(4 * count):
        i, j = torch.randint(len(facts), (2,), generator=generator).tolist()
        text = facts[i].prompt.replace("{}", facts[j].subject)
        if i != j and facts[i].subject != facts[j].subject and text not in edits and text not in out:
            out.append(text)
        if len(out) == count:
            break
    return out


def ties_merge(changes: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """TIES merging of shard changes: per entry, the sign of the sum wins; agreeing changes are averaged."""
    stacked, moved = torch.stack(changes), torch.stack(masks).float()
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (moved > 0)
    count = agree.float().sum(0).clamp(min=1)
    return (stacked * agree).sum(0) / count


@register_method
class WISE(EditMethod):
    name = "wise"
    config_class = WISEConfig
    layer_role = "late"
    summary = "a side memory of one layer behind a router, edited in shards and merged (lifelong)"
    experimental = ("after 1,000 edits on SmolLM2 the new answer beat the old one for 38 % of the facts (33 % before "
                    "editing; docs/results/lifelong.md): its router reads the positions that answer, which carry the "
                    "relation more than the subject, so it cannot tell an edit from the relation's other subjects")
    tiny_settings = dict(layers=[2], n_iter=10)
    config: WISEConfig

    def default_layers(self, model, spec: ArchSpec) -> list[int]:
        return super().default_layers(model, spec)[:1]

    def compute(self, model, tokenizer, facts, spec, state=None):
        raise EditpackError("WISE makes a side-memory pack, not a weight delta: use editpack.edit(..., method='wise')")

    def build_pack(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec, *, name: str, version: str,
                   parents, state=None, previous: SideMemoryPack | None = None) -> SideMemoryPack:

        cfg = self.config
        self.resolve_layers(model, spec)
        if cfg.unrelated_samples is None:
            cfg.unrelated_samples = list(UNRELATED)
        module = spec.mlp_out_name(cfg.layers[0])
        if previous is not None and previous.module != module:
            raise EditpackError(f"{previous.ref} is a side memory of {previous.module}; it cannot grow at {module}")
        device = model_device(model)
        weight = spec.weight_matrix(model.get_submodule(module))
        delta = (previous.delta.modules[module].dense().to(device, torch.float32) if previous is not None
                 else torch.zeros(weight.shape, device=device))
        kept = [previous.facts[i] for i in kept_indices(previous.facts, facts)] if previous else []
        all_facts = kept + list(facts)
        unrelated = self.unrelated_inputs(model, tokenizer, module, all_facts)
        scale = float((unrelated @ weight.detach().float().T).norm(dim=-1).mean())  # the layer's output norm
        generator = torch.Generator().manual_seed(cfg.seed + (len(previous.facts) if previous is not None else 0))
        changes, masks = [], []
        for start in range(0, len(facts), cfg.facts_per_shard):
            mask = (torch.rand(delta.shape, generator=generator) < cfg.mask_ratio).to(device)
            changes.append(self.train_shard(model, tokenizer, module, facts[start : start + cfg.facts_per_shard],
                                            delta, mask, unrelated, scale))
            masks.append(mask)
        delta = delta + ties_merge(changes, masks)
        threshold = self.threshold(model, tokenizer, module, all_facts, delta, unrelated)
        result = WeightDelta()
        result.add(module, LowRankDelta.from_dense(delta.cpu()))
        return SideMemoryPack(name=name, version=version, method=self.name, hyperparameters=cfg.recorded(),
                              facts=all_facts, base=describe_base(model, [module]), delta=result,
                              fan_in_fan_out=spec.mlp_transposed, parents=parents, threshold=threshold)

    # ------------------------------------------------------------------------------------------ internals
    def unrelated_inputs(self, model, tokenizer, module: str, facts: Sequence[Fact]) -> torch.Tensor:
        """The module's inputs at every position of unrelated text, ``(tokens, d_in)``: texts the model samples,
        and the facts' own prompts with another fact's subject (same relation, another subject: the router must
        tell them apart), up to ``len(unrelated_samples[0])`` of those."""
        count, length = self.config.unrelated_samples
        texts = unrelated_texts(model, tokenizer, count, length, self.config.seed)
        texts += swapped_prompts(facts, count, self.config.seed)
        return inputs_everywhere(model, tokenizer, module, texts)

    def train_shard(self, model, tokenizer, module: str, facts: Sequence[Fact], start: torch.Tensor,
                    mask: torch.Tensor, unrelated: torch.Tensor, scale: float) -> torch.Tensor:
        """This shard's change to the side memory (zero outside ``mask``)."""
        cfg = self.config
        batch = target_batch(tokenizer, facts, model_device(model))
        change = torch.zeros_like(start, requires_grad=True)
        optimizer = torch.optim.Adam([change], lr=cfg.lr)
        answered: dict[str, torch.Tensor] = {}

        def side(output, _name):
            hidden = first_tensor(output)
            shift = answered["x"].float() @ (start + change * mask).T
            answered["shift"] = shift
            return replace_first(output, hidden + shift.to(hidden.dtype))

        def keep_input(inputs, _name):
            answered["x"] = inputs
            return inputs

        with frozen(model), torch.enable_grad():
            for _ in range(cfg.n_iter):
                optimizer.zero_grad()
                with Trace(model, module, retain_output=False, edit_input=keep_input, edit_output=side):
                    loss = batch.nll(batch.logits(model))
                at_edits = answered["shift"][batch.rows, batch.cols].norm(dim=-1) / scale
                on_unrelated = (unrelated @ (start + change * mask).T).norm(dim=-1) / scale
                hinge = (torch.relu(on_unrelated - cfg.alpha).mean() + torch.relu(cfg.beta - at_edits).mean()
                         + torch.relu(cfg.gamma - (at_edits.min() - on_unrelated.max())))
                (loss + cfg.act_weight * hinge).backward()
                optimizer.step()
        return (change * mask).detach()

    @torch.no_grad()
    def threshold(self, model, tokenizer, module: str, facts: Sequence[Fact], delta: torch.Tensor,
                  unrelated: torch.Tensor) -> float:
        batch = target_batch(tokenizer, facts, model_device(model))
        with Trace(model, module, retain_input=True, retain_output=False, stop=True) as trace:
            model(**batch.inputs)
        inputs = trace.input[batch.rows, batch.cols].float()  # the positions that answer an edit
        edits = (inputs @ delta.T).norm(dim=-1)
        noise = (unrelated @ delta.T).norm(dim=-1)
        low, high = float(noise.max()), float(edits.min())
        return round((low + high) / 2 if high > low else low, 6)
