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

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ...arch import ArchSpec, get_module
from ...facts import Fact
from ...generation import model_device, padding_side, sample_from_start
from ...nethook import Trace
from ...stats import StatsConfig, second_moment
from ..base import EditMethod, register_method
from ..delta import LowRankDelta, WeightDelta
from ..split_batch import split_batch
from .config import ROMEConfig


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


@contextlib.contextmanager
def weights_in(model: torch.nn.Module, dtype_name: str, spec: ArchSpec) -> Iterator[None]:
    """Run with the decoder blocks' floating-point weights cast to ``dtype_name``; originals put back after.

    The original tensors are kept by reference and restored as they were (no round trip), so the model's
    weights afterwards are bit for bit what they were before. The embedding and LM head keep their dtype: the
    head is applied to a handful of positions, where a low-precision copy gains nothing.
    """
    if dtype_name not in _OPT_DTYPES:
        raise ValueError(f"optimize_dtype must be one of {', '.join(_OPT_DTYPES)}, not {dtype_name!r}")
    dtype = _OPT_DTYPES[dtype_name]
    saved = []
    blocks = get_module(model, spec.blocks)
    for tensor in list(blocks.parameters()) + list(blocks.buffers()):
        if tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) and tensor.dtype != dtype:
            saved.append((tensor, tensor.data))
    if not saved:
        yield
        return

    def to(value, target):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
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


# ---------------------------------------------------------------------------------------------- the method
@register_method
class ROME(EditMethod):
    name = "rome"
    config_class = ROMEConfig
    config: ROMEConfig

    def resolve(self, model, tokenizer, spec: ArchSpec) -> ROMEConfig:
        """Fill in what the config leaves open (layers, context templates) so it can be recorded as used."""
        cfg = self.config
        if cfg.layers is None:
            cfg.layers = spec.default_layers(self.name, model)
        depth = spec.num_layers(model)
        bad = [layer for layer in cfg.layers if not 0 <= layer < depth]
        if bad:
            raise ValueError(f"ROME layers {bad} are outside 0..{depth - 1} for this {spec.family} model")
        if cfg.mom2_adjustment and cfg.stats_tokens is None:
            cfg.stats_tokens = SAMPLED_STATS_TOKENS if cfg.stats_corpus is None else CORPUS_STATS_TOKENS
        if cfg.context_templates is None:
            # Remembered on the model object (not globally), so repeated edits of one model sample them once.
            memo = model.__dict__.setdefault("_editpack_context_templates", {})
            key = (repr(cfg.context_template_lengths), cfg.seed)
            if key not in memo:
                memo[key] = sample_context_templates(model, tokenizer, cfg.context_template_lengths, cfg.seed)
            cfg.context_templates = list(memo[key])
        return cfg

    def compute(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec) -> WeightDelta:
        cfg = self.resolve(model, tokenizer, spec)
        # Statistics come from the unedited model: fetch them all before any weight changes.
        inv_source = {layer: self._second_moment(model, tokenizer, spec, layer) for layer in cfg.layers}
        result = WeightDelta()
        originals: dict[str, torch.Tensor] = {}
        try:
            with frozen(model), torch.enable_grad():
                for fact in facts:
                    for layer in cfg.layers:
                        name = spec.mlp_out_name(layer)
                        delta = self._edit_one(model, tokenizer, spec, layer, fact, inv_source[layer])
                        weight = get_module(model, name).weight
                        originals.setdefault(name, weight.detach().clone())
                        with torch.no_grad():  # apply now so the next fact sees this one
                            update = delta.dense().to(weight.dtype)
                            weight += update.T if spec.mlp_transposed else update
                        result.add(name, delta)
        finally:
            with torch.no_grad():
                for name, tensor in originals.items():
                    get_module(model, name).weight.copy_(tensor)
        return result

    # ------------------------------------------------------------------------------------------ internals
    def _second_moment(self, model, tokenizer, spec: ArchSpec, layer: int) -> torch.Tensor | None:
        cfg = self.config
        if not cfg.mom2_adjustment:
            return None
        stats = StatsConfig(corpus=cfg.stats_corpus, n_tokens=cfg.stats_tokens, seed=cfg.seed)
        return second_moment(model, tokenizer, spec, layer, stats)

    def _edit_one(self, model, tokenizer, spec, layer, fact: Fact, mom2) -> LowRankDelta:
        left = self._left_vector(model, tokenizer, spec, layer, fact, mom2)
        right = self._right_vector(model, tokenizer, spec, layer, fact, left)
        return LowRankDelta(B=right.unsqueeze(1), A=left.unsqueeze(0))

    def _lookups(self, tokenizer, templates: Sequence[str], fact: Fact) -> tuple[list[str], list[int]]:
        texts, idxs = [], []
        for template in templates:
            text, start, end = fill(template, fact)
            texts.append(text)
            idxs.append(subject_last_index(tokenizer, text, start, end))
        return texts, idxs

    @torch.no_grad()
    def _keys(self, model, tokenizer, module: str, texts: Sequence[str], idxs: Sequence[int]) -> torch.Tensor:
        batch = encode(tokenizer, texts, model_device(model))
        with Trace(model, module, retain_input=True, retain_output=False, stop=True) as tr:
            model(**batch)
        rows = torch.arange(len(idxs), device=tr.input.device)
        return tr.input[rows, torch.tensor(idxs, device=rows.device)].float()

    def _left_vector(self, model, tokenizer, spec, layer, fact: Fact, mom2) -> torch.Tensor:
        templates = [t.format(fact.prompt) for t in self.config.context_templates]
        texts, idxs = self._lookups(tokenizer, templates, fact)
        key = self._keys(model, tokenizer, spec.mlp_out_name(layer), texts, idxs).mean(0)
        if mom2 is not None:
            mom2 = mom2.to(key.device, torch.float32)
            ridge = self.config.mom2_ridge * mom2.diagonal().mean()
            eye = torch.eye(mom2.shape[0], device=key.device)
            key = torch.linalg.solve(mom2 + ridge * eye, key)
        return key / key.norm()

    def _right_vector(self, model, tokenizer, spec, layer, fact: Fact, left: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        device = model_device(model)
        module = spec.mlp_out_name(layer)
        target_ids = tokenizer(" " + fact.target_new, add_special_tokens=False)["input_ids"]
        if not target_ids:
            raise ValueError(f"target {fact.target_new!r} tokenizes to nothing")
        target_prefix = tokenizer.decode(target_ids[:-1])
        rewrite_templates = [t.format(fact.prompt) + target_prefix for t in cfg.context_templates]
        kl_templates = ["{} is a"]
        texts, idxs = self._lookups(tokenizer, rewrite_templates + kl_templates, fact)
        n_rewrite = len(rewrite_templates)
        # Nothing before the subject's last token depends on δ: cache it once, optimise over the suffixes.
        batch = split_batch(tokenizer, texts, idxs, device)
        cols = torch.tensor(batch.edit_columns, device=device)
        rows = torch.arange(len(texts), device=device)

        # Only some positions need logits: those predicting the new answer's tokens, and the KL lookups.
        # Projecting just those through the LM head (not every position onto the vocabulary) saves most time.
        target_rows, target_cols, target_tokens = [], [], []
        for i in range(n_rewrite):
            end = batch.suffix_lengths[i]
            for j, token in enumerate(target_ids):
                target_rows.append(i)
                target_cols.append(end - len(target_ids) + j)
                target_tokens.append(token)
        target_rows = torch.tensor(target_rows, device=device)
        target_cols = torch.tensor(target_cols, device=device)
        target_tokens = torch.tensor(target_tokens, device=device)
        kl_rows = rows[n_rewrite:]

        width = get_module(model, module).weight.shape[1 if spec.mlp_transposed else 0]
        delta = torch.zeros(width, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=cfg.v_lr)
        target_init: torch.Tensor | None = None
        kl_init: torch.Tensor | None = None

        def add_delta(output, _layer):
            nonlocal target_init
            if target_init is None:
                target_init = output[0, batch.edit_columns[0]].detach().float().clone()
            mask = torch.zeros(output.shape[:2] + (1,), device=output.device, dtype=output.dtype)
            mask[rows, cols] = 1
            return output + mask * delta.to(output.dtype)

        with weights_in(model, cfg.optimize_dtype, spec):
            batch.prime(model)
            for step in range(cfg.v_num_grad_steps):
                optimizer.zero_grad()
                with Trace(model, module, retain_output=False, edit_output=add_delta):
                    hidden = batch.run(model)  # the final norm's output
                picked_hidden = torch.cat([hidden[kl_rows, cols[n_rewrite:]], hidden[target_rows, target_cols]])
                all_log_probs = F.log_softmax(head_logits(model, spec, picked_hidden), dim=-1)  # one pass over the head
                kl_log_probs, log_probs = all_log_probs[: len(kl_rows)], all_log_probs[len(kl_rows) :]
                if kl_init is None:
                    kl_init = kl_log_probs.detach().clone()
                picked = log_probs.gather(1, target_tokens.unsqueeze(1)).squeeze(1)
                nll = -picked.sum() / (len(target_ids) * n_rewrite)
                kl = cfg.kl_factor * F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="batchmean")
                decay = cfg.v_weight_decay * (delta.norm() / target_init.norm() ** 2)
                loss = nll + kl + decay
                if loss.item() < cfg.early_stop_loss or step == cfg.v_num_grad_steps - 1:
                    break
                loss.backward()
                optimizer.step()
                max_norm = cfg.clamp_norm_factor * target_init.norm()
                with torch.no_grad():
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())

        # Key k and current value W k at the bare prompt (no prefix), in the model's own precision. The new value
        # is v* = W k + δ, so the update is ΔW = δ uᵀ / (uᵀ k), and (W + ΔW) k = v*.
        text, start, end = fill(fact.prompt, fact)
        idx = subject_last_index(tokenizer, text, start, end)
        single = encode(tokenizer, [text], device)
        with torch.no_grad(), Trace(model, module, retain_input=True, retain_output=False, stop=True) as tr:
            model(**single)
        cur_input = tr.input[0, idx].float()
        return delta.detach().float() / torch.dot(cur_input, left)
