"""ROME's computation: key k* at the subject's last token, value v* by optimisation, closed-form rank-one update.

For each fact, with W the layer's MLP output projection in ``(out, in)`` orientation:

- ``k̄`` = mean over context prefixes of the projection's input at the subject's last token, and
  ``u = C⁻¹ k̄ / ‖C⁻¹ k̄‖`` (C the keys' second moment, or I);
- ``v* = W k + δ``, with δ optimised so the model predicts the new target after the prompt (NLL), keeps its
  distribution on "{subject} is a" (KL), with a norm penalty and clamp, stopping early once the loss is small;
- ``ΔW = (v* − W k) uᵀ / (uᵀ k)`` where k is the key of the bare prompt: rank one, and ``(W + ΔW) k = v*``.

Several facts are edited one after another, each on the model with the earlier ones applied; the weights are
restored exactly before :meth:`ROME.compute` returns, and the deltas come back as stacked rank-one factors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ...packs.delta import LowRankDelta, WeightDelta
from ..._io import sha256_file
from ...model.arch import ArchSpec
from ...errors import EditpackError
from ...facts import Fact
from ...model.generation import model_device
from ...model.stats import StatsConfig, second_moments
from ..base import EditMethod, register_method
from ..locate import (
    add_update, applied_updates, context_templates, frozen, keys, optimize_delta, read_at, lookups,
    resolve_optimize_dtype
)
from .config import ROMEConfig

CORPUS_STATS_TOKENS = 100_000
SAMPLED_STATS_TOKENS = 20_000


def resolve_locate_config(cfg, method: EditMethod, model, tokenizer, spec: ArchSpec):
    """Fill in what a locate-then-edit config leaves open (layers, statistics size, context templates)."""
    method.resolve_layers(model, spec)
    if cfg.stats_corpus and Path(cfg.stats_corpus).is_file():
        digest = sha256_file(cfg.stats_corpus)
        if cfg.stats_corpus_sha256 not in (None, digest):
            raise EditpackError(f"statistics corpus {cfg.stats_corpus} is not the corpus this pack's statistics came "
                                f"from (sha256 {cfg.stats_corpus_sha256[:16]}…); pass that corpus, or set "
                                "stats_corpus_sha256=null to use this one")
        cfg.stats_corpus_sha256 = digest
    elif cfg.stats_corpus and cfg.stats_corpus_sha256 is None:
        raise EditpackError(f"statistics corpus {cfg.stats_corpus} does not exist")
    if cfg.mom2_adjustment and cfg.stats_tokens is None:
        cfg.stats_tokens = SAMPLED_STATS_TOKENS if cfg.stats_corpus is None else CORPUS_STATS_TOKENS
    if cfg.context_templates is None:
        cfg.context_templates = context_templates(model, tokenizer, cfg.context_template_lengths, cfg.seed)
    cfg.optimize_dtype = resolve_optimize_dtype(cfg.optimize_dtype, model_device(model))
    return cfg


def layer_second_moments(cfg, model, tokenizer, spec: ArchSpec, layers) -> dict[int, torch.Tensor | None]:
    """The cached key second moments at ``layers``, missing ones computed in one pass (``None`` for each when
    ``mom2_adjustment`` is off)."""
    if not cfg.mom2_adjustment:
        return {layer: None for layer in layers}
    stats = StatsConfig(corpus=cfg.stats_corpus, corpus_sha256=cfg.stats_corpus_sha256, n_tokens=cfg.stats_tokens,
                        seed=cfg.seed)
    return second_moments(model, tokenizer, spec, list(layers), stats)


@register_method
class ROME(EditMethod):
    name = "rome"
    config_class = ROMEConfig
    layer_role = "critical"
    summary = "rank-one edit of one MLP layer per fact (default)"
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
                    delta = self._edit_one(model, tokenizer, spec, layer, fact, inv_source[layer])
                    add_update(model, spec, name, delta.dense(), originals)  # the next fact sees this one
                    result.add(name, delta)
        return result

    # ------------------------------------------------------------------------------------------ internals
    def _edit_one(self, model, tokenizer, spec, layer, fact: Fact, mom2) -> LowRankDelta:
        left = self._left_vector(model, tokenizer, spec, layer, fact, mom2)
        right = self._right_vector(model, tokenizer, spec, layer, fact, left)
        return LowRankDelta(B=right.unsqueeze(1), A=left.unsqueeze(0))

    def _left_vector(self, model, tokenizer, spec, layer, fact: Fact, mom2) -> torch.Tensor:
        key = keys(model, tokenizer, spec.mlp_out_name(layer), [fact], self.config.context_templates)[0]
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
