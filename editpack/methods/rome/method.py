"""ROME's computation: key k* at the subject's last token, value v* by optimisation, closed-form rank-one update.

For each fact, with W the layer's MLP output projection in ``(out, in)`` orientation:

- ``k̄`` = mean over context prefixes of the projection's input at the subject's last token, and
  ``u = C⁻¹ k̄ / ‖C⁻¹ k̄‖`` (C the keys' second moment, or I);
- ``v* = W k + δ``, with δ optimised so the model predicts the new target after the prompt (NLL), keeps its
  distribution on "{subject} is a" (KL), with a norm penalty and clamp, stopping early once the loss is small;
- ``ΔW = (v* − W k) uᵀ / (uᵀ k)`` where k is the key of the bare prompt: rank one, and ``(W + ΔW) k = v*``.

On a Mixture-of-Experts block (docs/concepts/moe.md) δ is optimised at the block's output, and each expert the
subject's last token is routed to (router weight wₑ, k of them) gets its own rank-one update of its slice of the
stacked ``down_proj``, with its own key and statistics, so that Σₑ wₑ ΔWₑ kₑ = δ; router and other experts stay.

Several facts are edited one after another, each on the model with the earlier ones applied; the weights are
restored exactly before :meth:`ROME.compute` returns, and the deltas come back as stacked rank-one factors.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...facts import Fact
from ...model.arch import ArchSpec
from ...packs.delta import ExpertsDelta, LowRankDelta, WeightDelta
from ..base import EditMethod, register_method
from ..locate.experts import down_weight, experts_module, fact_expert_keys
from ..locate.keys import keys, lookups, read_at
from ..locate.model_state import add_update, applied_updates, frozen
from ..locate.resolve import layer_second_moments, resolve_locate_config
from ..locate.values import TINY_LOCATE, optimize_delta
from .config import ROMEConfig


@register_method
class ROME(EditMethod):
    name = "rome"
    config_class = ROMEConfig
    layer_role = "critical"
    edits_experts = True
    summary = "rank-one edit of one MLP layer per fact (default)"
    tiny_settings = dict(TINY_LOCATE, layers=[1], v_num_grad_steps=10)
    config: ROMEConfig

    def resolve(self, model, tokenizer, spec: ArchSpec) -> ROMEConfig:
        """Fill in what the config leaves open (layers, context templates) so it can be recorded as used."""
        return resolve_locate_config(self.config, self, model, tokenizer, spec)

    def compute(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec, state=None) -> WeightDelta:
        cfg = self.resolve(model, tokenizer, spec)
        # Statistics come from the unedited model: fetch them all before any weight changes.
        inv_source = layer_second_moments(cfg, model, tokenizer, spec, cfg.layers)
        result = WeightDelta()
        with applied_updates(model, spec) as originals, frozen(model), torch.enable_grad():
            for fact in facts:
                for layer in cfg.layers:
                    name = spec.mlp_out_name(layer)
                    edit_one = self._edit_experts if spec.experts else self._edit_one
                    delta = edit_one(model, tokenizer, spec, layer, fact, inv_source[layer])
                    add_update(model, spec, name, delta.dense(), originals)  # the next fact sees this one
                    result.add(name, delta)
        return result

    # ------------------------------------------------------------------------------------------ internals
    def _edit_one(self, model, tokenizer, spec, layer, fact: Fact, mom2) -> LowRankDelta:
        left = self._left_vector(model, tokenizer, spec, layer, fact, mom2)
        right = self._right_vector(model, tokenizer, spec, layer, fact, left)
        return LowRankDelta(B=right.unsqueeze(1), A=left.unsqueeze(0))

    def _edit_experts(self, model, tokenizer, spec, layer, fact: Fact, mom2) -> ExpertsDelta:
        """The update of each expert the fact's subject is routed to at ``layer`` (see the module docstring)."""
        experts = experts_module(model, spec, layer)
        found = fact_expert_keys(model, tokenizer, spec, layer, [fact], self.config.context_templates)[0]
        optimized = optimize_delta(model, tokenizer, spec, spec.mlp_name(layer), fact, self.config)
        factors = {}
        for expert, weight in zip(found.experts, found.weights):
            left = self._direction(found.keys[expert], None if mom2 is None else mom2[expert])
            share = optimized.delta / (len(found.experts) * weight)  # Σₑ wₑ · share = δ
            factors[expert] = LowRankDelta(B=(share / torch.dot(found.current[expert], left)).unsqueeze(1),
                                           A=left.unsqueeze(0))
        out, inner = down_weight(experts, 0).shape
        return ExpertsDelta.from_experts(factors, experts.down_proj.shape[0], out, inner)

    def _left_vector(self, model, tokenizer, spec, layer, fact: Fact, mom2) -> torch.Tensor:
        key = keys(model, tokenizer, spec.mlp_out_name(layer), [fact], self.config.context_templates)[0]
        return self._direction(key, mom2)

    def _direction(self, key: torch.Tensor, mom2) -> torch.Tensor:
        """``C⁻¹ k / ‖C⁻¹ k‖`` (ridge-regularised; ``k / ‖k‖`` without statistics)."""
        if mom2 is not None:
            mom2 = mom2.to(key.device, torch.float32)
            ridge = self.config.mom2_ridge * mom2.diagonal().mean()
            eye = torch.eye(mom2.shape[0], device=key.device)
            key = torch.linalg.solve(mom2 + ridge * eye, key)
        return key / key.norm()

    def _right_vector(self, model, tokenizer, spec, layer, fact: Fact, left: torch.Tensor) -> torch.Tensor:
        module = spec.mlp_out_name(layer)
        optimized = optimize_delta(model, tokenizer, spec, module, fact, self.config)
        # Key k and current value W k at the bare prompt (no prefix), in the model's own precision. The new value
        # is v* = W k + δ, so the update is ΔW = δ uᵀ / (uᵀ k), and (W + ΔW) k = v*.
        texts, idxs = lookups(tokenizer, [fact.prompt], fact)
        cur_input = read_at(model, tokenizer, module, texts, idxs, inputs=True)[0]
        return optimized.delta / torch.dot(cur_input, left)
