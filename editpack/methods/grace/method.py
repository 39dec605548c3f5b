"""GRACE (Hartvigsen et al. 2023): each fact becomes a codebook entry at one layer; the weights never change.

For each fact, at the wrapped module (an MLP output projection: the ``critical`` layer for subject keys, the
``late`` layer for prompt keys):

- the **key** is the module's input at the bare prompt's subject's last token (``key_position="subject"``,
  default) or at its last token (``"prompt"``, the paper's choice);
- the **value** is the module's output there plus δ, with δ optimised as ROME optimises its value (NLL on the
  new target over context-prefixed prompts, KL, norm penalty; :func:`editpack.methods.locate.optimize_deltas`,
  ``facts_per_batch`` facts at a time), so replacing the output by the value makes the model answer the target;
- the **deferral radius** starts at ``radius_scale`` × the farthest the key moves when context prefixes precede
  the prompt (with ``unrelated_samples``, at most ``radius_margin`` of the way to the nearest activation at any
  position of text the model samples: without that cap a key near the first token's attention-sink activation
  matched the first token of every prompt), and GRACE's rules (:func:`editpack.packs.codebook.insert`) grow it (an overlapping key with the same
  answer) or split it (another answer) as entries are added, one fact after another.

The result is a :class:`~editpack.packs.codebook.CodebookPack`; :func:`editpack.extend` adds entries to it round after
round (a fact about the same subject and relation replaces its old entry).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...errors import EditpackError
from ...facts import Fact
from ...model.arch import ArchSpec
from ...model.generation import model_device
from ...packs.base_model import describe_base
from ...packs.codebook import CodebookPack, insert
from ..base import EditMethod, register_method
from ..locate.context import context_templates, unrelated_texts
from ..locate.keys import inputs_everywhere, position_lookups, read_at
from ..locate.model_state import frozen, resolve_optimize_dtype
from ..locate.values import optimize_deltas, suffix_length
from .config import GRACEConfig


@register_method
class GRACE(EditMethod):
    name = "grace"
    config_class = GRACEConfig
    layer_role = "late"
    edits_experts = True
    summary = "a codebook at one layer (lookups with deferral radii); weights untouched, for lifelong editing"
    tiny_settings = dict(layers=[1], context_template_lengths=[[3, 2]], v_num_grad_steps=10)
    config: GRACEConfig

    def compute(self, model, tokenizer, facts, spec, state=None):
        raise EditpackError("GRACE makes a codebook pack, not a weight delta: use editpack.edit(..., method='grace')")

    def default_layers(self, model, spec: ArchSpec) -> list[int]:
        """Subject keys sit where ROME edits (the ``critical`` layer, where the subject's MLPs recall it); prompt keys
        at the ``late`` layer, where the prompt's last token holds subject and relation (GRACE's setting)."""
        return spec.role_layers("critical" if self.config.key_position == "subject" else "late", model)[:1]

    def resolve(self, model, tokenizer, spec: ArchSpec) -> GRACEConfig:
        cfg = self.config
        self.resolve_layers(model, spec)
        if cfg.context_templates is None:
            cfg.context_templates = context_templates(model, tokenizer, cfg.context_template_lengths, cfg.seed)
        cfg.optimize_dtype = resolve_optimize_dtype(cfg.optimize_dtype, model_device(model))
        return cfg

    def entries(self, model, tokenizer, spec: ArchSpec, module: str,
                facts: Sequence[Fact]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys ``(n, d_in)``, values ``(n, d_out)`` and initial deferral radii ``(n,)`` for ``facts``."""
        cfg = self.config
        with frozen(model), torch.enable_grad():
            order = sorted(range(len(facts)), key=lambda i: suffix_length(tokenizer, facts[i]))
            found = {}
            for start in range(0, len(order), cfg.facts_per_batch):
                chunk = order[start : start + cfg.facts_per_batch]
                found.update(zip(chunk, optimize_deltas(model, tokenizer, spec, module, [facts[i] for i in chunk],
                                                        cfg, at=cfg.key_position)))
        values = torch.stack([found[i].init + found[i].delta for i in range(len(facts))])
        texts, idxs = [], []
        for fact in facts:  # the bare prompt first, then the prompt after each context prefix
            t, i = position_lookups(tokenizer, [t.format(fact.prompt) for t in ["{}", *cfg.context_templates]],
                                    fact, cfg.key_position)
            texts += t
            idxs += i
        read = read_at(model, tokenizer, module, texts, idxs, inputs=True)
        read = read.reshape(len(facts), len(cfg.context_templates) + 1, -1)
        keys = read[:, 0]
        radii = cfg.radius_scale * (read[:, 1:] - keys[:, None]).norm(dim=-1).amax(dim=1)
        if cfg.unrelated_samples:  # never reach an unrelated token: at most a margin of the way to the nearest
            count, length = cfg.unrelated_samples
            unrelated = inputs_everywhere(model, tokenizer, module,
                                          unrelated_texts(model, tokenizer, count, length, cfg.seed))
            nearest = torch.cdist(keys, unrelated.to(keys.device)).amin(dim=1)
            radii = torch.minimum(radii, cfg.radius_margin * nearest)
        radii = torch.maximum(radii, 1e-3 * keys.norm(dim=1))  # the edit prompt itself always matches
        return keys.cpu(), values.cpu(), radii.cpu()

    def build_pack(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec, *, name: str, version: str,
                   parents, state=None, previous: CodebookPack | None = None) -> CodebookPack:

        cfg = self.resolve(model, tokenizer, spec)
        module = spec.wrap_name(cfg.layers[0])
        if previous is not None and previous.module != module:
            raise EditpackError(f"{previous.ref} is a codebook at {previous.module}; it cannot grow at {module}")
        keys, values, radii = self.entries(model, tokenizer, spec, module, facts)
        if previous is not None:  # the entries that stay: facts about other subjects and relations
            kept = previous.without(facts)
            book_keys, book_radii, book_values = previous.keys[kept], previous.radii[kept], previous.values[kept]
            old_facts = [previous.facts[i] for i in kept]
        else:
            book_keys, book_radii = torch.zeros(0, keys.shape[1]), torch.zeros(0)
            book_values, old_facts = torch.zeros(0, values.shape[1]), []
        targets = [f.target_new for f in old_facts]
        for i, fact in enumerate(facts):
            book_keys, book_radii, _ = insert(book_keys, book_radii, targets, keys[i], float(radii[i]),
                                              fact.target_new)
            targets.append(fact.target_new)
        return CodebookPack(name=name, version=version, method=self.name, hyperparameters=cfg.recorded(),
                            facts=old_facts + list(facts), base=describe_base(model, [module]), parents=parents,
                            module=module, keys=book_keys, values=torch.cat([book_values, values]), radii=book_radii)
