"""LoRA baseline: train PEFT LoRA adapters on the MLP output projections, then read the factors out.

The adapter is trained with PEFT's own layers (``get_peft_model``), its factors are taken as the delta
(``B · scaling`` and ``A``, rank ``rank``), and the model is unloaded back to exactly what it was.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..._lazy import peft
from ...errors import EditpackError
from ...facts import Fact
from ...model.arch import ArchSpec
from ...packs.delta import LowRankDelta, WeightDelta
from ..base import EditMethod, register_method
from ..finetune import train
from ..locate.model_state import frozen
from .config import LoRAConfig

_ADAPTER = "editpack-train"


@register_method
class LoRA(EditMethod):
    name = "lora"
    config_class = LoRAConfig
    layer_role = "run"
    summary = "LoRA fine-tuning baseline on a run of MLP output projections"
    tiny_settings = dict(layers=[1, 2], num_steps=10)
    config: LoRAConfig

    def compute(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec, state=None) -> WeightDelta:

        cfg = self.config
        if any(hasattr(m, "base_layer") for m in model.modules()):
            raise EditpackError("LoRA training needs a model without unmerged packs: apply them with merge=True "
                                "first, or use another method")
        names = [spec.mlp_out_name(layer) for layer in self.resolve_layers(model, spec)]
        peft_config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=names, lora_dropout=0.0,
                                 bias="none", fan_in_fan_out=spec.mlp_transposed, task_type="CAUSAL_LM")
        result = WeightDelta()
        with frozen(model):
            with torch.random.fork_rng(devices=[]):  # PEFT initialises lora_A randomly: seeded, RNG untouched
                torch.manual_seed(cfg.seed)
                peft_model = peft.get_peft_model(model, peft_config, adapter_name=_ADAPTER)
            try:
                params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
                for p in params:
                    p.requires_grad_(True)
                train(peft_model, tokenizer, list(facts), params, steps=cfg.num_steps, lr=cfg.lr,
                      batch_size=cfg.batch_size, early_stop_loss=cfg.early_stop_loss, seed=cfg.seed)
                inner = peft_model.base_model.model
                for name in names:
                    layer = inner.get_submodule(name)
                    a = layer.lora_A[_ADAPTER].weight.detach().float().clone()
                    b = layer.lora_B[_ADAPTER].weight.detach().float().clone() * layer.scaling[_ADAPTER]
                    result.add(name, LowRankDelta(B=b, A=a))
            finally:
                restored = peft_model.unload()
                if hasattr(restored, "peft_config"):
                    del restored.peft_config
        return result
