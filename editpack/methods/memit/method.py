"""MEMIT (Meng et al. 2023): a batch of facts, the residual spread over the layers of a critical range.

1. For each fact, a target hidden state ``z = h + δ`` at the output of the last edited block, at the subject's
   last token, with δ optimised as in ROME (NLL on the new target, KL, norm penalty and clamp); the facts' δ
   are optimised together, ``facts_per_batch`` at a time, each with its own loss and early stop. Where the MLP's
   output reaches the stream through a norm, δ is optimised at the last MLP's output instead, and ``z − h`` is the
   change it makes through that norm.
2. For each edited layer ``l`` in order: keys ``K`` (the MLP output projection's input at the subject's last
   token, averaged over context prefixes), the remaining residual ``R = (z − h_now) / (layers left)`` (written
   through the architecture's ``mlp_out_norm`` where the MLP's output passes one: :func:`through_norm`), and the
   update ``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹``, applied before the next layer is processed.

On a Mixture-of-Experts block (docs/concepts/moe.md) each fact's residual is shared among the experts its
subject's last token is routed to (``rₑ = R / (k · wₑ)`` for router weights ``wₑ``), and each expert is solved on the
facts routed to it, with its own keys and statistics: ``ΔWₑ = Rₑ Kₑᵀ (λCₑ + Kₑ Kₑᵀ)⁻¹``.

``ΔW`` is stored as the factors ``B = R`` (out × n) and ``A = ((λC + K Kᵀ)⁻¹ K)ᵀ`` (n × in): rank ≤ n facts.
Subclasses (AlphaEdit) change only :meth:`MEMIT.update_factor` and :meth:`MEMIT.finish`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...facts import Fact
from ...errors import UnknownArchitectureError
from ...model.arch import ArchSpec, get_module
from ...packs.delta import ExpertsDelta, LowRankDelta, WeightDelta
from ..base import EditMethod, register_method
from ..locate.experts import down_weight, experts_module, fact_expert_keys
from ..locate.keys import keys, outputs_at_subject
from ..locate.model_state import add_update, applied_updates, frozen
from ..locate.resolve import layer_second_moments, resolve_locate_config
from ..locate.through_norm import through, through_norm
from ..locate.values import TINY_LOCATE, optimize_deltas, suffix_length
from .config import MEMITConfig


@register_method
class MEMIT(EditMethod):
    name = "memit"
    config_class = MEMITConfig
    layer_role = "spread"
    edits_experts = True
    summary = "many facts in one batch, spread over a run of layers"
    tiny_settings = dict(TINY_LOCATE, layers=[1, 2], v_num_grad_steps=10)
    config: MEMITConfig

    def compute(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec, state=None) -> WeightDelta:
        cfg = resolve_locate_config(self.config, self, model, tokenizer, spec)
        layers = sorted(cfg.layers)
        cfg.layers = layers
        mom2 = layer_second_moments(cfg, model, tokenizer, spec, layers)  # missing layers: one pass for all
        block = spec.block_name(layers[-1])
        # Where the MLP's output reaches the stream through a norm, δ is optimised at the last layer's MLP output
        # (as ROME does), so the residual target is one that layer can reach through its norm.
        normed = spec.mlp_out_norm_name(layers[-1])
        if normed and spec.experts:
            raise UnknownArchitectureError(f"the {spec.family} file names both experts and an MLP output norm; "
                                           f"{self.name} edits no Mixture-of-Experts block behind a norm")
        at = spec.mlp_out_name(layers[-1]) if normed else block
        result = WeightDelta()
        with frozen(model):
            with torch.enable_grad():
                # Facts of similar prompt length share a batch (less padding); results come back in order.
                order = sorted(range(len(facts)), key=lambda i: suffix_length(tokenizer, facts[i]))
                found = {}
                for start in range(0, len(order), cfg.facts_per_batch):
                    chunk = order[start : start + cfg.facts_per_batch]
                    found.update(zip(chunk, optimize_deltas(model, tokenizer, spec, at,
                                                            [facts[i] for i in chunk], cfg)))
                optimized = [found[i] for i in range(len(facts))]
            targets = torch.stack([o.init + o.delta for o in optimized])  # (n, hidden)
            if normed:  # the residual change the optimised output makes through the last layer's norm
                norm, init = get_module(model, normed), torch.stack([o.init for o in optimized])
                moved = through(norm, targets) - through(norm, init)
                targets = outputs_at_subject(model, tokenizer, block, facts).to(moved.device) + moved
            with applied_updates(model, spec) as originals:
                for i, layer in enumerate(layers):
                    name = spec.mlp_out_name(layer)
                    now = outputs_at_subject(model, tokenizer, block, facts)  # (n, hidden)
                    resid = (targets - now.to(targets.device)) / (len(layers) - i)
                    if spec.experts:
                        delta = self.experts_update(model, tokenizer, spec, layer, facts, resid, mom2[layer], state)
                        add_update(model, spec, name, delta.dense(), originals)
                        result.add(name, delta)
                        continue
                    k = keys(model, tokenizer, name, facts, cfg.context_templates)  # (n, in)
                    norm = spec.mlp_out_norm_name(layer)
                    if norm:  # the output reaches the stream through a norm (Gemma 2/3, OLMo 2)
                        outputs = outputs_at_subject(model, tokenizer, name, facts).to(resid.device)
                        resid = through_norm(get_module(model, norm), outputs, resid, name=norm)
                    a = self.update_factor(k, mom2[layer], name, state)  # (n, in)
                    delta = LowRankDelta(B=resid.T.contiguous(), A=a.contiguous())
                    add_update(model, spec, name, delta.dense(), originals)
                    result.add(name, delta)
                result.state = self.finish(model, tokenizer, spec, facts, layers, state)
        return result

    def experts_update(self, model, tokenizer, spec, layer, facts, resid: torch.Tensor, mom2, state) -> ExpertsDelta:
        """Each routed expert's share of the residuals ``resid`` (``(n, hidden)``), solved on its own facts."""
        experts = experts_module(model, spec, layer)
        found = fact_expert_keys(model, tokenizer, spec, layer, facts, self.config.context_templates)
        name = spec.mlp_out_name(layer)
        factors = {}
        for expert in sorted({e for f in found for e in f.experts}):
            rows = [(i, f.weights[f.experts.index(expert)], len(f.experts)) for i, f in enumerate(found)
                    if expert in f.experts]
            k = torch.stack([found[i].keys[expert] for i, _, _ in rows]).to(resid.device)  # (m, in)
            shares = torch.stack([resid[i] / (n * w) for i, w, n in rows])  # (m, out): Σₑ wₑ · share = R
            a = self.update_factor(k, None if mom2 is None else mom2[expert], f"{name}.{expert}", state)
            factors[expert] = LowRankDelta(B=shares.T.contiguous(), A=a.contiguous())
        out, inner = down_weight(experts, 0).shape
        return ExpertsDelta.from_experts(factors, experts.down_proj.shape[0], out, inner)

    def update_factor(self, k: torch.Tensor, mom2: torch.Tensor | None, module: str, state) -> torch.Tensor:
        """``A = ((λC + KᵀK)⁻¹ Kᵀ)ᵀ`` for keys ``k`` as rows; C = I without statistics."""
        d = k.shape[1]
        c = mom2.to(k.device, torch.float32) if mom2 is not None else torch.eye(d, device=k.device)
        system = self.config.mom2_update_weight * c + k.T @ k
        return torch.linalg.solve(system, k.T).T

    def finish(self, model, tokenizer, spec, facts, layers, state) -> dict[str, torch.Tensor]:
        """State to keep in the pack for the next round (MEMIT keeps none)."""
        return {}
