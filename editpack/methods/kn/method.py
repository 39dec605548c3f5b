"""KN (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers"): find the neurons that express a fact,
then move their value vectors from the old answer to the new one.

1. **Attribution**: for each prompt of the fact (its prompt and paraphrases) and each layer, the MLP's
   intermediate activation ``a`` at the prompt's last token (the input of the MLP output projection) is scaled
   along the path ``α·a``, ``α = k/m`` for ``k = 1…m``; the attribution of neuron ``i`` is
   ``a_i · mean_k ∂p(y | α_k a)/∂a_i`` (integrated gradients with a zero baseline, Riemann sum), with ``y`` the
   current answer's first token (``target_true``, or the model's own prediction). Only the last token's
   activations change along the path, so the prompt's prefix is run once and cached: each layer's path is one
   batched pass of the last token alone (forward and backward), and one traced pass reads every layer's ``a``.
2. **Knowledge neurons**: per prompt, the neurons above ``threshold`` × that prompt's largest attribution (over
   all layers); with several prompts, those kept for at least ``share`` of them; at most ``max_neurons``.
3. **Edit**: each kept neuron's value vector (its column of the output projection ``W``) moves by
   ``edit_scale · (u_new − u_old)``, ``u`` the output embeddings (LM head rows) of the new answer's and the current
   answer's first tokens. Per layer the change is one vector times an indicator of the kept neurons: rank 1.

It is simple and known to be weak (it moves one token, with no optimisation); the methods table reports it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...facts import Fact
from ...model.arch import ArchSpec, get_module
from ...model.generation import cache_argument, cache_of, continuation_ids, model_device
from ...model.nethook import TraceDict
from ...packs.delta import LowRankDelta, WeightDelta
from ..base import EditMethod, register_method
from ..locate.model_state import frozen
from .config import KNConfig


@register_method
class KN(EditMethod):
    name = "kn"
    config_class = KNConfig
    layer_role = "critical"  # unused: every layer unless ``layers`` is given
    summary = "knowledge neurons by integrated gradients, value vectors moved (weak baseline)"
    tiny_settings = dict(max_neurons=5, edit_scale=4.0)
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
            new = continuation_ids(tokenizer, fact.target_new, after=fact.prompt)[0]
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
            return continuation_ids(tokenizer, fact.target_true, "true answer", fact.prompt)[0]
        batch = tokenizer(fact.text, return_tensors="pt").to(model_device(model))
        return int(model(**batch).logits[0, -1].argmax())

    def knowledge_neurons(self, model, tokenizer, spec: ArchSpec, prompts: Sequence[str],
                          answer: int) -> list[tuple[int, int]]:
        cfg = self.config
        votes: dict[tuple[int, int], int] = {}
        strength: dict[tuple[int, int], float] = {}
        for prompt in prompts:
            context = self.prompt_context(model, tokenizer, spec, prompt)
            scores: dict[int, torch.Tensor] = {}
            for start in range(0, len(cfg.layers), cfg.layers_per_pass):
                scores.update(self.attributions(model, spec, context, cfg.layers[start : start + cfg.layers_per_pass],
                                                answer))
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

    @torch.no_grad()
    def prompt_context(self, model, tokenizer, spec: ArchSpec, prompt: str) -> "_PromptContext":
        """One forward pass of the prompt: every attributed layer's intermediate activation at the last token,
        and the key/value cache of the tokens before it (the integrated-gradients passes then run the last token
        alone: only its activations are scaled, so the prefix is the same on every step)."""
        device = model_device(model)
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        modules = [spec.mlp_out_name(layer) for layer in self.config.layers]
        with TraceDict(model, modules, retain_input=True, retain_output=False) as traces:
            model(input_ids=ids)
        activations = {m: traces[m].input[0, -1].detach().float() for m in modules}
        cache = cache_of(model(input_ids=ids[:, :-1], use_cache=True)) if ids.shape[1] > 1 else None
        return _PromptContext(ids=ids, activations=activations, cache=cache)

    def attribution(self, model, spec: ArchSpec, context: "_PromptContext", layer: int, answer: int) -> torch.Tensor:
        """Integrated-gradients attribution of each intermediate neuron of ``layer`` at the prompt's last token."""
        return self.attributions(model, spec, context, [layer], answer)[layer]

    def attributions(self, model, spec: ArchSpec, context: "_PromptContext", layers: Sequence[int],
                     answer: int) -> dict[int, torch.Tensor]:
        """:meth:`attribution` for several layers in one batched pass: ``ig_steps`` rows per layer, each block of
        rows scaling its own layer's activation (rows never interact, so each block is that layer's path)."""
        steps = self.config.ig_steps
        modules = {spec.mlp_out_name(layer): k for k, layer in enumerate(layers)}
        alphas = torch.arange(1, steps + 1, dtype=torch.float32) / steps
        scaled = {m: (alphas.to(context.activations[m].device)[:, None] * context.activations[m][None])
                  .requires_grad_(True) for m in modules}

        def inject(inputs, name):
            inputs = inputs.clone()
            k = modules[name]
            inputs[k * steps : (k + 1) * steps, -1] = scaled[name].to(inputs.dtype)
            return inputs

        rows = steps * len(layers)
        inputs: dict[str, Any] = {"input_ids": context.ids[:, -1:].expand(rows, 1)}
        if context.cache is not None:
            cache = copy.deepcopy(context.cache)  # a forward pass appends to it
            cache.batch_repeat_interleave(rows)
            inputs.update({cache_argument(model): cache, "use_cache": True,
                           "attention_mask": torch.ones(rows, context.ids.shape[1], dtype=torch.long,
                                                        device=context.ids.device)})
        with frozen(model), torch.enable_grad(), TraceDict(model, list(modules), retain_output=False,
                                                           edit_input=inject):
            probs = model(**inputs).logits[:, -1].float().softmax(-1)[:, answer]
            grads = torch.autograd.grad(probs.sum(), [scaled[m] for m in modules])
        return {layers[k]: (context.activations[m] * g.mean(0)).cpu() for (m, k), g in zip(modules.items(), grads)}


@dataclass
class _PromptContext:
    ids: torch.Tensor  # (1, T)
    activations: dict[str, torch.Tensor]  # module name -> (d_ff,) at the last token
    cache: Any  # the key/value cache of ids[:, :-1] (None for a one-token prompt)
