"""Machinery shared by the locate-then-edit methods (ROME, MEMIT, AlphaEdit).

- where the subject sits in a prompt (:func:`subject_last_index`, :func:`fill`), right-padded batches;
- context prefixes sampled from the model (:func:`context_templates`, remembered on the model object);
- keys: the input of an MLP output projection at the subject's last token, averaged over prefixes (:func:`keys`);
- the value optimisation (:func:`optimize_delta`): a vector δ added at the subject's last token to a module's
  output so that the model predicts the new target (NLL), keeps its distribution on "{subject} is a" (KL), with a
  norm penalty and clamp and early stopping;
- precision and gradient control while optimising (:func:`weights_in`, :func:`frozen`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..model.arch import ArchSpec, get_module
from .base import MethodConfig, at_least, each, non_empty, one_of, positive
from ..facts import Fact
from ..model.generation import continuation, continuation_ids, model_device, padding_side, sample_from_start
from ..model.nethook import Trace, replace_first
from .split_batch import split_batch

@dataclass
class ValueOptimization(MethodConfig):
    """The settings of :func:`optimize_deltas` that a method's config carries (ROME, MEMIT, AlphaEdit, GRACE)."""

    bounds: ClassVar[dict] = {
        "v_num_grad_steps": (at_least(1),), "v_lr": (positive,), "v_weight_decay": (at_least(0),),
        "clamp_norm_factor": (positive,), "kl_factor": (at_least(0),), "early_stop_loss": (at_least(0),),
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


CORPUS_STATS_TOKENS = 100_000
SAMPLED_STATS_TOKENS = 20_000


# ---------------------------------------------------------------------------------------------- token helpers
def subject_last_index(tokenizer, text: str, start: int, end: int) -> int:
    """Index of the last token overlapping characters ``[start, end)`` of ``text`` (the subject)."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if hits:
            return hits[-1]
    # Slow tokenizers: the prefix up to the subject's end, tokenized on its own (ROME's approach).
    return len(tokenizer(text[:end])["input_ids"]) - 1


def encode(tokenizer, texts: Sequence[str], device) -> dict[str, torch.Tensor]:
    """Right-padded batch: positions are those of the unpadded texts, so indices computed per text hold."""
    with padding_side(tokenizer, "right"):
        batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def fill(template: str, fact: Fact) -> tuple[str, int, int]:
    """``template`` (a prefix plus the fact's prompt, one ``{}``) with the subject in, and the subject's span."""
    start = template.index("{}")
    return template.replace("{}", fact.subject), start, start + len(fact.subject)


def sample_context_templates(model, tokenizer, lengths: Sequence[Sequence[int]], seed: int) -> list[str]:
    """ROME's context prefixes: short texts the model samples (top-k 5), each followed by ``". {}"``."""
    templates = ["{}"]
    for index, (length, count) in enumerate(lengths):
        out = sample_from_start(model, tokenizer, count, length, top_k=5, seed=seed + index)
        for text in tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True):
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            templates.append(f"{text}. {{}}")
    return templates


def head_logits(model, spec: ArchSpec, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (float32) for final-norm outputs ``hidden``, as the model's own head computes them."""
    logits = get_module(model, spec.lm_head)(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


_OPT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_optimize_dtype(name: str, device: torch.device) -> str:
    """``"auto"`` → ``"bfloat16"`` where ``device`` has fast bf16 arithmetic, else ``"float32"``; others as given."""
    if name != "auto":
        if name not in _OPT_DTYPES:
            raise ValueError(f"optimize_dtype must be auto or one of {', '.join(_OPT_DTYPES)}, not {name!r}")
        return name
    device = torch.device(device)
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":  # oneDNN's check: AVX-512 BF16 or AMX
        fast = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    else:
        fast = False
    return "bfloat16" if fast else "float32"


@contextlib.contextmanager
def attention_for_gradients(model: torch.nn.Module) -> Iterator[None]:
    """On a CPU, run attention with the plain matmul ("eager") implementation for the duration.

    PyTorch's CPU flash-attention backward is slow (in bf16 about 3 ms per call on SmolLM2, a third of a step);
    the matmul form gives the same values and a fast backward. GPUs keep the model's own implementation.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if model_device(model).type != "cpu" or current in (None, "eager") or setter is None:
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(current)


@contextlib.contextmanager
def weights_in(model: torch.nn.Module, dtype_name: str, spec: ArchSpec) -> Iterator[None]:
    """Run with the decoder blocks' and the LM head's floating-point weights cast to ``dtype_name``; originals
    put back after.

    The original tensors are kept by reference and restored as they were (no round trip), so the model's
    weights afterwards are bit for bit what they were before. The head is cast too: a batch of facts asks for
    logits at hundreds of positions, and over a vocabulary of 50k–128k that product costs as much as the blocks.
    (A head tied to the input embedding is cast once, with it; the final norm keeps its own dtype.)
    """
    if dtype_name not in _OPT_DTYPES:
        raise ValueError(f"optimize_dtype must be one of {', '.join(_OPT_DTYPES)}, not {dtype_name!r}")
    dtype = _OPT_DTYPES[dtype_name]
    saved = []
    blocks = get_module(model, spec.blocks)
    head = get_module(model, spec.lm_head)
    tensors = list(blocks.parameters()) + list(blocks.buffers()) + list(head.parameters())
    for tensor in {id(t): t for t in tensors}.values():
        if tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) and tensor.dtype != dtype:
            saved.append((tensor, tensor.data))
    if not saved:
        yield
        return

    def to(value, target):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if value.dtype == target:
                return value
            # An additive mask holds float32's minimum, which rounds to -inf in bf16: a fully masked row (left
            # padding) would then softmax to NaN in eager attention. Clamp to the target's finite range.
            limits = torch.finfo(target)
            if limits.max < torch.finfo(value.dtype).max:
                value = value.clamp(limits.min, limits.max)
            return value.to(target)
        if isinstance(value, (tuple, list)):
            return type(value)(to(v, target) for v in value)
        return value

    def into_blocks(_module, args, kwargs):  # hidden states, rotary tables, float masks
        return to(args, dtype), {k: to(v, dtype) for k, v in kwargs.items()}

    final_norm = get_module(model, spec.final_norm)
    out_dtype = saved[0][1].dtype

    def out_of_blocks(_module, args, kwargs):
        return to(args, out_dtype), kwargs

    handles = [block.register_forward_pre_hook(into_blocks, with_kwargs=True) for block in blocks]
    handles.append(final_norm.register_forward_pre_hook(out_of_blocks, with_kwargs=True))
    handles.append(head.register_forward_pre_hook(into_blocks, with_kwargs=True))
    handles.append(head.register_forward_hook(lambda _module, _args, output: to(output, out_dtype)))
    cast: dict[int, torch.Tensor] = {}
    try:
        for tensor, data in saved:
            if id(data) not in cast:  # tied weights share one tensor: cast it once
                cast[id(data)] = data.to(dtype)
            tensor.data = cast[id(data)]
        yield
    finally:
        for tensor, data in saved:
            tensor.data = data
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)




def context_templates(model, tokenizer, lengths: Sequence[Sequence[int]], seed: int) -> list[str]:
    """:func:`sample_context_templates`, remembered on the model object (not globally) per lengths and seed."""
    memo = model.__dict__.setdefault("_editpack_context_templates", {})
    key = (repr(lengths), seed)
    if key not in memo:
        memo[key] = sample_context_templates(model, tokenizer, lengths, seed)
    return list(memo[key])


def unrelated_texts(model, tokenizer, count: int, length: int, seed: int) -> list[str]:
    """``count`` texts of ``length`` tokens the model samples (top-k 5), remembered on the model object (not
    globally) per size and seed: unrelated text for calibrating what an edit must leave alone."""
    memo = model.__dict__.setdefault("_editpack_unrelated_texts", {})
    if (count, length, seed) not in memo:
        templates = sample_context_templates(model, tokenizer, [[length, count]], seed + 1000)[1:]
        memo[(count, length, seed)] = [t.replace(". {}", ".") for t in templates]
    return list(memo[(count, length, seed)])


@torch.no_grad()
def inputs_everywhere(model, tokenizer, module: str, texts: Sequence[str]) -> torch.Tensor:
    """``module``'s input at every (unpadded) position of ``texts``, float32, ``(tokens, d_in)``."""
    batch = encode(tokenizer, texts, model_device(model))
    rows, cols = batch["attention_mask"].nonzero(as_tuple=True)
    with Trace(model, module, retain_input=True, retain_output=False, stop=True) as trace:
        model(**batch)
    return trace.input[rows, cols].float()


def lookups(tokenizer, templates: Sequence[str], fact: Fact) -> tuple[list[str], list[int]]:
    """Each template (with one ``{}``) filled with the fact's subject, and the subject's last token index."""
    texts, idxs = [], []
    for template in templates:
        text, start, end = fill(template, fact)
        texts.append(text)
        idxs.append(subject_last_index(tokenizer, text, start, end))
    return texts, idxs


#: Where an edit reads its key and writes its value: the subject's last token (ROME, MEMIT) or the prompt's
#: last token (GRACE's codebook keys).
POSITIONS = ("subject", "prompt")


def prompt_lookups(tokenizer, templates: Sequence[str], fact: Fact) -> tuple[list[str], list[int]]:
    """Each template filled with the fact's subject, and the index of its last token."""
    texts = [fill(template, fact)[0] for template in templates]
    return texts, [len(tokenizer(text)["input_ids"]) - 1 for text in texts]


def position_lookups(tokenizer, templates: Sequence[str], fact: Fact, at: str) -> tuple[list[str], list[int]]:
    """:func:`lookups` (``at="subject"``) or :func:`prompt_lookups` (``at="prompt"``)."""
    if at not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, not {at!r}")
    return (lookups if at == "subject" else prompt_lookups)(tokenizer, templates, fact)


@torch.no_grad()
def read_at(model, tokenizer, module: str, texts: Sequence[str], idxs: Sequence[int], *, inputs: bool,
            batch_size: int = 64) -> torch.Tensor:
    """A module's input (``inputs=True``) or output at one token per text, float32, ``(len(texts), dim)``."""
    device = model_device(model)
    rows = []
    for start in range(0, len(texts), batch_size):
        chunk, at = texts[start : start + batch_size], idxs[start : start + batch_size]
        batch = encode(tokenizer, chunk, device)
        with Trace(model, module, retain_input=inputs, retain_output=not inputs, stop=True) as tr:
            model(**batch)
        value = tr.input if inputs else tr.output
        index = torch.arange(len(chunk), device=value.device)
        rows.append(value[index, torch.tensor(at, device=value.device)].float())
    return torch.cat(rows)


def keys(model, tokenizer, module: str, facts: Sequence[Fact], templates: Sequence[str]) -> torch.Tensor:
    """``(len(facts), d_in)``: each fact's key at ``module``'s input, averaged over the context templates."""
    texts, idxs = [], []
    for fact in facts:
        t, i = lookups(tokenizer, [template.format(fact.prompt) for template in templates], fact)
        texts += t
        idxs += i
    values = read_at(model, tokenizer, module, texts, idxs, inputs=True)
    return values.reshape(len(facts), len(templates), -1).mean(1)


def outputs_at_subject(model, tokenizer, module: str, facts: Sequence[Fact]) -> torch.Tensor:
    """``(len(facts), d)``: ``module``'s output at each bare prompt's subject-last token."""
    texts, idxs = [], []
    for fact in facts:
        t, i = lookups(tokenizer, [fact.prompt], fact)
        texts += t
        idxs += i
    return read_at(model, tokenizer, module, texts, idxs, inputs=False)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


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
    texts, idxs, owners, targets = [], [], [], []
    for f, fact in enumerate(facts):
        t, i, target_ids = rewrite_lookups(tokenizer, fact, cfg.context_templates, at)
        targets.append(target_ids)
        texts += t
        idxs += i
        owners += [f] * len(t)
    n_rewrite = len(cfg.context_templates)  # rows per fact; the facts' rewrite rows come first, in order
    first_rows = torch.arange(n_facts, device=device) * n_rewrite  # each fact's bare prompt + target prefix
    for fact in facts:
        t, i = lookups(tokenizer, ["{} is a"], fact)
        texts += t
        idxs += i
    # Nothing before the subject's last token depends on δ: cache it once, optimise over the suffixes.
    batch = split_batch(tokenizer, texts, idxs, device)
    cols = torch.tensor(batch.edit_columns, device=device)
    rows = torch.arange(len(texts), device=device)
    owner_of_row = torch.tensor(owners + list(range(n_facts)), device=device)

    # Only some positions need logits: those predicting the new answers' tokens, and the KL lookups.
    target_rows, target_cols, target_tokens, target_owner = [], [], [], []
    for r in range(n_facts * n_rewrite):
        ids = targets[owners[r]]
        end = batch.suffix_lengths[r]
        for j, token in enumerate(ids):
            target_rows.append(r)
            target_cols.append(end - len(ids) + j)
            target_tokens.append(token)
            target_owner.append(owners[r])
    target_rows = torch.tensor(target_rows, device=device)
    target_cols = torch.tensor(target_cols, device=device)
    target_tokens = torch.tensor(target_tokens, device=device)
    target_owner = torch.tensor(target_owner, device=device)
    nll_scale = torch.tensor([1.0 / (len(ids) * n_rewrite) for ids in targets], device=device)
    kl_rows = rows[n_facts * n_rewrite :]

    delta: torch.Tensor | None = None  # (n_facts, hidden)
    optimizer = None
    init: torch.Tensor | None = None
    kl_init: torch.Tensor | None = None

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
            picked_hidden = torch.cat([hidden[kl_rows, cols[kl_rows]], hidden[target_rows, target_cols]])
            all_log_probs = F.log_softmax(head_logits(model, spec, picked_hidden), dim=-1)  # one pass over the head
            kl_log_probs, log_probs = all_log_probs[:n_facts], all_log_probs[n_facts:]
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()
            picked = log_probs.gather(1, target_tokens.unsqueeze(1)).squeeze(1)
            nll = -torch.zeros(n_facts, device=device).index_add(0, target_owner, picked) * nll_scale
            kl = cfg.kl_factor * F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="none").sum(-1)
            decay = cfg.v_weight_decay * (delta.norm(dim=1) / init.norm(dim=1) ** 2)
            loss = nll + kl + decay  # (n_facts,)
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


@contextlib.contextmanager
def applied_updates(model, spec: ArchSpec) -> Iterator[dict[str, torch.Tensor]]:
    """Weights changed inside the block (``add_update``) are restored exactly on exit."""
    originals: dict[str, torch.Tensor] = {}
    try:
        yield originals
    finally:
        with torch.no_grad():
            for name, tensor in originals.items():
                get_module(model, name).weight.copy_(tensor)


@torch.no_grad()
def add_update(model, spec: ArchSpec, name: str, dense: torch.Tensor, originals: dict[str, torch.Tensor]) -> None:
    """Add ``dense`` (``(out, in)``) to module ``name``'s weight now, keeping the original in ``originals``."""
    weight = get_module(model, name).weight
    originals.setdefault(name, weight.detach().clone())
    update = dense.to(device=weight.device, dtype=weight.dtype)
    weight += update.T if spec.mlp_transposed else update
