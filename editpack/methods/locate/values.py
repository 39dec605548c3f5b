"""The value optimisation of locate-then-edit methods: a vector δ added at the subject's last token to a module's
output so that the model predicts the new target (NLL), keeps its distribution on "{subject} is a" (KL) and, with
``retain_factor``, its next-token distribution after the subject under other relations (retention), with a norm
penalty and clamp and early stopping; with ``paraphrase_prompts``, the new target also after other phrasings of the
edited relation; the settings a method's config carries for it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from ...facts import Fact
from ...model.arch import ArchSpec, get_module
from ...model.generation import continuation, continuation_ids, generate, model_device
from ...model.nethook import Trace, replace_first
from ...relations import subject_prompts_in_form, training_paraphrases_in_form
from ..base import MethodConfig, at_least, each, non_empty, one_of, positive
from .keys import _first, fill, lookups, position_lookups, subject_last_index
from .model_state import attention_for_gradients, head_logits, resolve_optimize_dtype, weights_in
from .split_batch import split_batch


@dataclass
class ValueOptimization(MethodConfig):
    """The settings of :func:`optimize_deltas` that a method's config carries (ROME, MEMIT, AlphaEdit, GRACE)."""

    bounds: ClassVar[dict] = {
        "v_num_grad_steps": (at_least(1),), "v_lr": (positive,), "v_weight_decay": (at_least(0),),
        "clamp_norm_factor": (positive,), "kl_factor": (at_least(0),), "early_stop_loss": (at_least(0),),
        "retain_factor": (at_least(0),), "retain_prompts": (at_least(0),), "retain_tokens": (at_least(1),),
        "paraphrase_prompts": (at_least(0),),
        "optimize_dtype": (one_of("auto", "float32", "bfloat16"),),
        "context_template_lengths": (each(lambda pair: None if len(pair) == 2 and pair[0] >= 1 and pair[1] >= 1
                                          else "must be [tokens, count], both at least 1", "each entry"),),
        "context_templates": (non_empty, each(lambda t: None if t.count("{}") == 1 else "must hold one {}",
                                              "each template")),
    }

    #: Optimisation of the value: 20 steps as in the ROME paper (EasyEdit's Llama files use 25).
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    #: Relation specificity: the weight of the mean KL(unedited ‖ edited) of the next-token distributions after
    #: the subject under ``retain_prompts`` other relations (:func:`editpack.relations.retention_prompts`:
    #: phrasings that the same-subject suites never ask), at the prompt's last token and along the first
    #: ``retain_tokens - 1`` tokens of the unedited model's greedy answer. A prompt the unedited model answers
    #: with the fact's old answer is the edited relation in other words and is not retained. 0 turns it off.
    #: Only where δ sits at the subject (not GRACE's prompt keys).
    retain_factor: float = 0.0
    retain_prompts: int = 12
    retain_tokens: int = 1
    #: Generalization: the new target is also optimised after up to this many other phrasings of the edited
    #: relation (:func:`editpack.relations.training_paraphrases`: never one that measures paraphrase), each
    #: without a context prefix, beside the prompt under every context prefix. 0 turns it off. Only where δ sits
    #: at the subject.
    paraphrase_prompts: int = 0
    early_stop_loss: float = 0.05
    #: Precision of the decoder blocks while δ is optimised: "float32", "bfloat16", or "auto" (bfloat16 where
    #: the device has fast bf16 arithmetic: a CUDA GPU that supports it, a CPU with AVX-512 BF16 / AMX; else
    #: float32). The resolved value is what the pack records. Keys, the covariance solve and the update stay in
    #: float32 either way.
    optimize_dtype: str = "auto"
    #: Context prefixes: (length in tokens, how many), sampled from the model with ``seed``. The resolved
    #: prefixes are recorded in ``context_templates`` so a pack says exactly what it was computed with.
    context_template_lengths: list[list[int]] = field(default_factory=lambda: [[5, 5], [10, 5]])
    context_templates: list[str] | None = None
    seed: int = 0


@dataclass
class Optimized:
    delta: torch.Tensor  # float32, added to the module's output at the subject's last token
    init: torch.Tensor  # the module's output there before (bare prompt + target prefix), float32
    loss: float
    steps: int


def suffix_length(tokenizer, fact: Fact) -> int:
    """Tokens from the subject's last one to the end of the prompt and the new target: the part of each of the
    fact's prompts that δ-optimisation recomputes. Batching facts of equal length wastes no padding."""
    text, start, end = fill(fact.prompt, fact)
    return (len(tokenizer(text + continuation(text, fact.target_new))["input_ids"])
            - subject_last_index(tokenizer, text, start, end))


def optimize_delta(model, tokenizer, spec: ArchSpec, module: str, fact: Fact, cfg) -> Optimized:
    """:func:`optimize_deltas` for one fact."""
    return optimize_deltas(model, tokenizer, spec, module, [fact], cfg)[0]


def rewrite_lookups(tokenizer, fact: Fact, templates: Sequence[str],
                    at: str = "subject") -> tuple[list[str], list[int], list[int]]:
    """The prompts δ is optimised over for ``fact``: each context template filled with the prompt and the new
    target's tokens but the last; each one's edited token index (``at``: the subject's last token, or the
    prompt's last token); and the target's token ids."""
    target_ids = continuation_ids(tokenizer, fact.target_new, after=fact.prompt)
    target_prefix = tokenizer.decode(target_ids[:-1])
    prompts = [t.format(fact.prompt) for t in templates]
    texts, idxs = lookups(tokenizer, [p + target_prefix for p in prompts], fact)
    if at != "subject":
        idxs = position_lookups(tokenizer, prompts, fact, at)[1]
    return texts, idxs, target_ids


def optimize_deltas(model, tokenizer, spec: ArchSpec, module: str, facts: Sequence[Fact], cfg,
                    at: str = "subject") -> list[Optimized]:
    """Optimise one δ per fact, added to ``module``'s output at the subject's last token (``at="prompt"``: at
    the prompt's last token), all in one batch.

    Each fact's loss is its own (NLL on its new target over its rewrite prompts, KL on its "{subject} is a",
    the norm penalty), and the total is their sum, so each δ's gradient is that of its fact alone; Adam is
    element-wise, so the result is that of optimising each fact by itself (up to floating-point order). A fact
    whose loss falls below ``early_stop_loss`` stops there: its δ is kept as it is for the remaining steps.

    ``cfg`` carries ``v_num_grad_steps``, ``v_lr``, ``v_weight_decay``, ``clamp_norm_factor``, ``kl_factor``,
    ``early_stop_loss``, ``optimize_dtype`` and the resolved ``context_templates``. Call inside :func:`frozen`
    with gradients enabled. Memory grows with ``len(facts)``: callers chunk (MEMIT's ``facts_per_batch``).
    """
    device = model_device(model)
    n_facts = len(facts)
    paraphrases = (training_paraphrases_in_form(tokenizer, facts, cfg.paraphrase_prompts)
                   if cfg.paraphrase_prompts and at == "subject" else [[] for _ in facts])
    texts, idxs, owners, targets, first_rows = [], [], [], [], []  # the facts' rewrite rows come first, in order
    for f, fact in enumerate(facts):
        first_rows.append(len(texts))  # the fact's bare prompt + target prefix
        variants = [(fact, cfg.context_templates)] + [(replace(fact, prompt=p), ["{}"]) for p in paraphrases[f]]
        for variant, templates in variants:
            t, i, target_ids = rewrite_lookups(tokenizer, variant, templates, at)
            targets += [target_ids] * len(t)
            texts += t
            idxs += i
            owners += [f] * len(t)
    n_rewrite = len(texts)
    first_rows = torch.tensor(first_rows, device=device)
    for fact in facts:
        t, i = lookups(tokenizer, ["{} is a"], fact)
        texts += t
        idxs += i
    retain_owners = []  # the subject under other relations, after the KL rows
    if cfg.retain_factor and cfg.retain_prompts and at == "subject":
        t, i, retain_owners = retention_lookups(model, tokenizer, facts, cfg.retain_prompts, cfg.retain_tokens)
        texts += t
        idxs += i
    # Nothing before the subject's last token depends on δ: cache it once, optimise over the suffixes.
    batch = split_batch(tokenizer, texts, idxs, device)
    cols = torch.tensor(batch.edit_columns, device=device)
    rows = torch.arange(len(texts), device=device)
    owner_of_row = torch.tensor(owners + list(range(n_facts)) + retain_owners, device=device)

    # Only some positions need logits: those predicting the new answers' tokens, and the KL lookups.
    # Each fact's NLL is the mean over its rewrite rows of each row's mean over its target's tokens.
    rows_of_fact = [owners.count(f) for f in range(n_facts)]
    target_rows, target_cols, target_tokens, target_owner, target_weight = [], [], [], [], []
    for r in range(n_rewrite):
        ids = targets[r]
        end = batch.suffix_lengths[r]
        for j, token in enumerate(ids):
            target_rows.append(r)
            target_cols.append(end - len(ids) + j)
            target_tokens.append(token)
            target_owner.append(owners[r])
            target_weight.append(1.0 / (len(ids) * rows_of_fact[owners[r]]))
    target_rows = torch.tensor(target_rows, device=device)
    target_cols = torch.tensor(target_cols, device=device)
    target_tokens = torch.tensor(target_tokens, device=device)
    target_owner = torch.tensor(target_owner, device=device)
    target_weight = torch.tensor(target_weight, device=device)
    kl_rows = rows[n_rewrite : n_rewrite + n_facts]
    # Each retention row's last ``retain_tokens`` positions: the prompt's last token and the answer's tokens.
    retain_rows, retain_cols, owner_list = [], [], []
    for r, owner in zip(rows[n_rewrite + n_facts :].tolist(), retain_owners):
        end, first = batch.suffix_lengths[r], batch.edit_columns[r]
        for col in range(max(first, end - cfg.retain_tokens), end):
            retain_rows.append(r)
            retain_cols.append(col)
            owner_list.append(owner)
    retain_rows = torch.tensor(retain_rows, device=device, dtype=torch.long)
    retain_cols = torch.tensor(retain_cols, device=device, dtype=torch.long)
    retain_owner = torch.tensor(owner_list, device=device, dtype=torch.long)
    retain_scale = 1.0 / torch.zeros(n_facts, device=device).index_add(
        0, retain_owner, torch.ones(len(owner_list), device=device)).clamp(min=1)

    delta: torch.Tensor | None = None  # (n_facts, hidden)
    optimizer = None
    init: torch.Tensor | None = None
    kl_init: torch.Tensor | None = None
    retain_init: torch.Tensor | None = None

    def add_delta(output, _layer):
        nonlocal init, delta, optimizer
        hidden = _first(output)
        if init is None:
            init = hidden[first_rows, cols[first_rows]].detach().float().clone()
            delta = torch.zeros(n_facts, hidden.shape[-1], device=hidden.device, requires_grad=True)
            optimizer = torch.optim.Adam([delta], lr=cfg.v_lr)
        mask = torch.zeros(hidden.shape[:2] + (1,), device=hidden.device, dtype=hidden.dtype)
        mask[rows, cols] = 1
        return replace_first(output, hidden + mask * delta.to(hidden.dtype)[owner_of_row].unsqueeze(1))

    active = torch.ones(n_facts, dtype=torch.bool, device=device)
    losses = torch.full((n_facts,), float("nan"))
    steps = torch.zeros(n_facts, dtype=torch.long)
    dtype_name = resolve_optimize_dtype(cfg.optimize_dtype, device)
    with weights_in(model, dtype_name, spec), attention_for_gradients(model):
        # Blocks below the one holding ``module`` see no δ: computed once in prime() and replayed per step.
        batch.prime(model, get_module(model, spec.blocks), spec.block_of(module) or 0)
        for step in range(cfg.v_num_grad_steps):
            if optimizer is not None:
                optimizer.zero_grad()
            with Trace(model, module, retain_output=False, edit_output=add_delta):
                hidden = batch.run(model)  # the final norm's output
            picked_hidden = torch.cat([hidden[kl_rows, cols[kl_rows]], hidden[retain_rows, retain_cols],
                                       hidden[target_rows, target_cols]])
            all_log_probs = F.log_softmax(head_logits(model, spec, picked_hidden), dim=-1)  # one pass over the head
            n_kl = n_facts + len(retain_rows)
            kl_log_probs, retain_log_probs = all_log_probs[:n_facts], all_log_probs[n_facts:n_kl]
            log_probs = all_log_probs[n_kl:]
            if kl_init is None:  # step 0: δ is zero, these are the unedited model's distributions
                kl_init = kl_log_probs.detach().clone()
                retain_init = retain_log_probs.detach().clone()
            picked = log_probs.gather(1, target_tokens.unsqueeze(1)).squeeze(1)
            nll = -torch.zeros(n_facts, device=device).index_add(0, target_owner, picked * target_weight)
            kl = cfg.kl_factor * F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="none").sum(-1)
            decay = cfg.v_weight_decay * (delta.norm(dim=1) / init.norm(dim=1) ** 2)
            loss = nll + kl + decay  # (n_facts,)
            if len(retain_rows):
                kept_kl = F.kl_div(retain_log_probs, retain_init, log_target=True, reduction="none").sum(-1)
                loss = loss + cfg.retain_factor * retain_scale * torch.zeros(n_facts, device=device).index_add(
                    0, retain_owner, kept_kl)
            values = loss.detach().cpu()  # one host sync per step
            live = active.cpu()
            losses[live] = values[live]
            steps[live] = step + 1
            if step == cfg.v_num_grad_steps - 1:
                break
            active &= (values >= cfg.early_stop_loss).to(device)
            if not bool(active.any()):
                break
            (loss * active).sum().backward()
            kept = delta.detach()[~active].clone()
            optimizer.step()
            with torch.no_grad():
                delta[~active] = kept  # Adam's momentum would move a finished fact's δ: put it back
                max_norm = cfg.clamp_norm_factor * init.norm(dim=1, keepdim=True)
                norm = delta.norm(dim=1, keepdim=True)
                delta.mul_(torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm)))
    final = delta.detach().float()
    return [Optimized(final[f].clone(), init[f], float(losses[f]), int(steps[f])) for f in range(n_facts)]


def answer_prefix(tokenizer, answer: str, count: int) -> str:
    """The text of ``answer``'s first ``count`` tokens, as written (its spaces kept)."""
    if count <= 0:
        return ""
    if getattr(tokenizer, "is_fast", False):
        offsets = [o for o in tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                   if o[1] > o[0]]
        return answer[: offsets[min(count, len(offsets)) - 1][1]] if offsets else ""
    return tokenizer.decode(tokenizer(answer, add_special_tokens=False)["input_ids"][:count])


@torch.no_grad()
def retention_lookups(model, tokenizer, facts: Sequence[Fact], count: int,
                      tokens: int) -> tuple[list[str], list[int], list[int]]:
    """The rows the retention term reads: for each fact, up to ``count`` of its subject's other relations
    (:func:`editpack.relations.retention_prompts`, in the fact's form) followed by the first ``tokens - 1`` tokens
    of the model's greedy answer; each row's subject-last index and owning fact. A prompt whose answer begins with
    the fact's old answer is left out: it asks the edited relation in other words, and the edit may move it."""
    prompts, at, owners = [], [], []
    templates = subject_prompts_in_form(tokenizer, facts, count, retention=True)
    for f, fact in enumerate(facts):
        filled, idxs = lookups(tokenizer, templates[f], fact)
        prompts += filled
        at += idxs  # the answer comes after the prompt: the subject's index stays
        owners += [f] * len(filled)
    answers = generate(model, tokenizer, prompts, max_new_tokens=max(tokens - 1, 4), batch_size=64) if prompts else []
    texts, idxs, kept = [], [], []
    for prompt, index, answer, owner in zip(prompts, at, answers, owners):
        old = facts[owner].target_true
        if old and answer.strip().casefold().startswith(old.strip().casefold()):
            continue
        texts.append(prompt + answer_prefix(tokenizer, answer, tokens - 1))
        idxs.append(index)
        kept.append(owner)
    return texts, idxs, kept


#: :attr:`~editpack.methods.base.EditMethod.tiny_settings` of the locate-then-edit methods. Tiny random models have
#: tiny MLP outputs, so ROME's norm clamp is lifted on them, no key statistics are gathered and the context prefixes
#: are short; the tiny facts' prompts end on the subject, so the edited position feeds the prediction directly.
TINY_LOCATE = dict(mom2_adjustment=False, context_template_lengths=[[3, 2]], clamp_norm_factor=1e4,
                   v_weight_decay=0.0)
