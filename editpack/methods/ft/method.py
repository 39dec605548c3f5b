"""FT-M (Zhang et al. 2024, EasyEdit): fine-tune the MLP output projections of a few layers on the new targets.

Only the target tokens carry loss (the prompt is masked), every other weight is frozen, and the weights are
restored exactly afterwards: the result is the dense difference, stored in the pack as a dense delta.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...facts import Fact
from ...model.arch import ArchSpec, get_module
from ...packs.delta import LowRankDelta, WeightDelta
from ..base import EditMethod, register_method
from ..finetune import train
from ..locate.model_state import frozen
from .config import FTConfig


@register_method
class FT(EditMethod):
    name = "ft"
    config_class = FTConfig
    layer_role = "critical"
    summary = "FT-M baseline: fine-tune one MLP output projection on the target tokens (dense delta)"
    tiny_settings = dict(layers=[2], num_steps=10)
    config: FTConfig

    def compute(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec, state=None) -> WeightDelta:
        cfg = self.config
        names = [spec.mlp_out_name(layer) for layer in self.resolve_layers(model, spec)]
        weights = [get_module(model, name).weight for name in names]
        originals = [w.detach().clone() for w in weights]
        result = WeightDelta()
        try:
            with frozen(model):
                for w in weights:
                    w.requires_grad_(True)
                train(model, tokenizer, list(facts), weights, steps=cfg.num_steps, lr=cfg.lr,
                      batch_size=cfg.batch_size, early_stop_loss=cfg.early_stop_loss, seed=cfg.seed)
            for name, w, original in zip(names, weights, originals):
                update = (w.detach() - original).float()
                result.add(name, LowRankDelta.from_dense(update.T if spec.mlp_transposed else update))
        finally:
            with torch.no_grad():
                for w, original in zip(weights, originals):
                    w.copy_(original)
        return result
