"""KN (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers"): find the neurons that express a fact,
then move their value vectors from the old answer to the new one.

1. **Attribution**: for each prompt of the fact (its prompt and paraphrases) and each layer, the MLP's
   intermediate activation ``a`` at the prompt's last token (the input of the MLP output projection) is scaled
   along the path ``α·a``, ``α = k/m`` for ``k = 1…m``; the attribution of neuron ``i`` is
   ``a_i · mean_k ∂p(y | α_k a)/∂a_i`` (integrated gradients with a zero baseline, Riemann sum), with ``y`` the
   current answer's first token (``target_true``, or the model's own prediction).
2. **Knowledge neurons**: per prompt, the neurons above ``threshold`` × that prompt's largest attribution (over
   all layers); with several prompts, those kept for at least ``share`` of them; at most ``max_neurons``.
3. **Edit**: each kept neuron's value vector (its column of the output projection ``W``) moves by
   ``edit_scale · (u_new − u_old)``, ``u`` the output embeddings (LM head rows) of the new answer's and the current
   answer's first tokens. Per layer the change is one vector times an indicator of the kept neurons: rank 1.

It is simple and known to be weak (it moves one token, with no optimisation); the methods table reports it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...arch import ArchSpec, get_module
from ...delta import LowRankDelta, WeightDelta
from ...facts import Fact
from ...generation import model_device
from ...nethook import Trace
from ..base import EditMethod, register_method
from ..locate import frozen
from .config import KNConfig


@register_method
class KN(EditMethod):
    name = "kn"
    config_class = KNConfig
    layer_role = "critical"  # unused: every layer unless ``layers`` is given
    summary = "knowledge neurons by integrated gradients, value vectors moved (weak baseline)"
    config: KNConfig

    def default_layers(self, model, spec: ArchSpec) -> list[int]:
        return list(range(spec.num_layers(model)))

    def compute(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec, state=None) -> WeightDelta:
        cfg = self.config
        self.resolve_layers(model, spec)
        head = get_module(model, spec.lm_head).weight  # (vocab, hidden): output embeddings
        result = WeightDelta()
        for fact in facts:
            prompts = [fact.text, *fact.paraphrases][: cfg.max_prompts]
            old = self.current_answer(model, tokenizer, fact)
            new = tokenizer(" " + fact.target_new, add_special_tokens=False)["input_ids"][0]
            neurons = self.knowledge_neurons(model, tokenizer, spec, prompts, old)
            direction = cfg.edit_scale * (head[new] - head[old]).detach().float().cpu()
            for layer in sorted({layer for layer, _ in neurons}):
                module = spec.mlp_out_name(layer)
                width = spec.weight_matrix(get_module(model, module)).shape[1]
                indicator = torch.zeros(1, width)
                indicator[0, [i for l, i in neurons if l == layer]] = 1.0
                result.add(module, LowRankDelta(B=direction.unsqueeze(1).clone(), A=indicator))
        return result

    @torch.no_grad()
    def current_answer(self, model, tokenizer, fact: Fact) -> int:
        if fact.target_true:
            return tokenizer(" " + fact.target_true, add_special_tokens=False)["input_ids"][0]
        batch = tokenizer(fact.text, return_tensors="pt").to(model_device(model))
        return int(model(**batch).logits[0, -1].argmax())

    def knowledge_neurons(self, model, tokenizer, spec: ArchSpec, prompts: Sequence[str],
                          answer: int) -> list[tuple[int, int]]:
        cfg = self.config
        votes: dict[tuple[int, int], int] = {}
        strength: dict[tuple[int, int], float] = {}
        for prompt in prompts:
            scores = {layer: self.attribution(model, tokenizer, spec, prompt, layer, answer) for layer in cfg.layers}
            top = max(float(s.max()) for s in scores.values())
            if top <= 0:
                continue
            for layer, s in scores.items():
                for i in torch.nonzero(s > cfg.threshold * top).flatten().tolist():
                    votes[(layer, i)] = votes.get((layer, i), 0) + 1
                    strength[(layer, i)] = strength.get((layer, i), 0.0) + float(s[i]) / top
        need = max(1, int(torch.tensor(cfg.share * len(prompts)).ceil()))
        kept = [n for n, v in votes.items() if v >= need]
        return sorted(kept, key=lambda n: -strength[n])[: cfg.max_neurons]

    def attribution(self, model, tokenizer, spec: ArchSpec, prompt: str, layer: int, answer: int) -> torch.Tensor:
        """Integrated-gradients attribution of each intermediate neuron of ``layer`` at the prompt's last token."""
        steps = self.config.ig_steps
        device = model_device(model)
        batch = tokenizer([prompt] * steps, return_tensors="pt").to(device)
        last = batch["input_ids"].shape[1] - 1
        module = spec.mlp_out_name(layer)
        with torch.no_grad(), Trace(model, module, retain_input=True, retain_output=False, stop=True) as trace:
            model(**tokenizer(prompt, return_tensors="pt").to(device))
        activation = trace.input[0, last].detach().float()
        alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps
        scaled = (alphas[:, None] * activation[None]).requires_grad_(True)

        def inject(inputs, _name):
            inputs = inputs.clone()
            inputs[:, last] = scaled.to(inputs.dtype)
            return inputs

        with frozen(model), torch.enable_grad(), Trace(model, module, retain_output=False, edit_input=inject):
            probs = model(**batch).logits[:, last].float().softmax(-1)[:, answer]
            (grad,) = torch.autograd.grad(probs.sum(), scaled)
        return (activation * grad.mean(0)).cpu()
