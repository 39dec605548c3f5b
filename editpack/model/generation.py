"""Batched greedy generation and next-token helpers (left padding, done right for every tokenizer)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .batches import (
    cache_argument,
    cache_of,
    forward_parameters,
    left_padded,
    length_batches,
    model_device,
    pad_id,
    padding_side,
)
from .drafts import check, eos_ids, verifiable
from .fingerprint import unwrap

#: Rows sharing fewer leading tokens than this are computed whole; longer shared prefixes are computed once.
MIN_SHARED_PREFIX = 32


def continuation(prompt: str, text: str) -> str:
    """``text`` as it continues ``prompt``: a space before it, unless the prompt ends in whitespace (a chat
    template's assistant header ends in a line break, after which an answer starts with no space)."""
    return text if prompt[-1:].isspace() else " " + text


def continuation_ids(tokenizer, text: str, what: str = "target", after: str = "") -> list[int]:
    """The token ids of ``text`` continuing the prompt ``after`` (:func:`continuation`; no special tokens), as
    edits optimise and scores read answers; a ``text`` that tokenizes to nothing is refused, naming ``what`` it
    is."""
    ids = tokenizer(continuation(after, text), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{what} {text!r} tokenizes to nothing")
    return ids


def generate(
    model,
    tokenizer,
    prompts: Sequence[str] | str,
    *,
    max_new_tokens: int | Sequence[int] = 20,
    batch_size: int = 16,
    drafts: Sequence[str | None] | None = None,
) -> list[str] | str:
    """Greedy continuations of ``prompts`` (only the new text). A single string in gives a single string out.
    ``max_new_tokens`` may give each prompt its own length (prompts of different lengths then share batches; each
    continuation is cut to its own).

    ``drafts`` (one per prompt, ``None`` for none) are guesses of the continuations, such as another model's
    answers to the same prompts: where :func:`verifiable`, each guess is checked with one teacher-forced forward
    and only the tokens after the first it gets wrong are decoded. The result is still this model's own greedy
    continuation; a good guess only makes it cheaper.

    A model that says how prompts batch best (``generation_order(prompts)``, as memory packs do: prompts answered
    in one context together, so it is computed once) gets them in that order; the outputs keep the given order."""
    single = isinstance(prompts, str)
    given = [prompts] if single else list(prompts)
    texts, _ = _greedy(model, tokenizer, given, max_new_tokens, batch_size, False, drafts)
    return texts[0] if single else texts


def generate_with_first_logits(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int | Sequence[int] = 20,
                               batch_size: int = 16, drafts: Sequence[str | None] | None = None,
                               ) -> tuple[list[str], torch.Tensor]:
    """:func:`generate`, and the logits of the first generated token after each prompt (``(len(prompts), vocab)``,
    float32): what :func:`next_token_logits` computes, read off the generation's first step instead of a forward
    of its own."""
    return _greedy(model, tokenizer, list(prompts), max_new_tokens, batch_size, True, drafts)


@torch.no_grad()
def _greedy(model, tokenizer, given: list[str], max_new_tokens: int | Sequence[int], batch_size: int,
            first_logits: bool, drafts: Sequence[str | None] | None = None) -> tuple[list[str], torch.Tensor | None]:
    limits = [max_new_tokens] * len(given) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(given):
        raise ValueError(f"{len(limits)} lengths for {len(given)} prompts")
    if drafts is not None and len(drafts) != len(given):
        raise ValueError(f"{len(drafts)} drafts for {len(given)} prompts")
    prompts = [tokenizer(text)["input_ids"] for text in given]
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i + 1} ({given[i]!r}) has no tokens: give some text to continue")
    if drafts is not None and given and verifiable(model):
        guessed = [[] if d is None else tokenizer(d, add_special_tokens=False)["input_ids"][:n]
                   for d, n in zip(drafts, limits)]
        eos = eos_ids(model, tokenizer)
        new, logits = check(model, prompts, guessed, limits, eos, pad_id(tokenizer), batch_size, first_logits)
        open_rows = [i for i, row in enumerate(new) if len(row) < limits[i] and not (row and row[-1] in eos)]
        if open_rows:
            more, _ = _decode(model, tokenizer, [prompts[i] + new[i] for i in open_rows],
                              [limits[i] - len(new[i]) for i in open_rows], batch_size, False)
            for i, extra in zip(open_rows, more):
                new[i] = new[i] + extra
        return tokenizer.batch_decode(new, skip_special_tokens=True), logits
    new, logits = _decode(model, tokenizer, prompts, limits, batch_size, first_logits, given)
    return tokenizer.batch_decode(new, skip_special_tokens=True), logits


def _decode(model, tokenizer, prompts: list[list[int]], limits: list[int], batch_size: int,
            first_logits: bool, texts: list[str] | None = None) -> tuple[list[list[int]], torch.Tensor | None]:
    """Greedy decoding of token-id prompts (``texts``: the same as text, for a model's ``generation_order``)
    with ``model.generate``; each row's new tokens cut to its limit."""
    ordering = getattr(model, "generation_order", None)
    device = model_device(model)
    if callable(ordering) and texts is not None and len(prompts) > 1:
        order = list(ordering(texts))
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    else:  # rows of like lengths together, so a short row is not decoded for a long one's steps
        order = sorted(range(len(prompts)), key=lambda i: -limits[i])
        batches = length_batches(order, limits, batch_size, split=device.type == "cpu")
        order = [i for chunk in batches for i in chunk]
    new: list[list[int]] = [[] for _ in prompts]
    rows: list[torch.Tensor] = []
    extra = dict(output_logits=True, return_dict_in_generate=True) if first_logits else {}
    for chunk in batches:
        ids, mask = left_padded([prompts[i] for i in chunk], pad_id(tokenizer), device)
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(limits[i] for i in chunk),
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )
        if first_logits:
            rows.append(generated.logits[0].float().cpu())
            generated = generated.sequences
        for i, row in zip(chunk, generated[:, ids.shape[1] :].tolist()):
            new[i] = row[: limits[i]]
    if not first_logits:
        return new, None
    logits = torch.empty(0) if not rows else torch.cat(rows)
    return new, logits[torch.tensor(order).argsort()] if len(order) else logits


#: Tokens decoded together when looking for a stop text: enough for any text a few tokens long to be seen whole.
STOP_WINDOW = 8


class StopAt:
    """A ``generate`` stopping criterion (``stopping_criteria=[...]``; a callable, so transformers is not imported
    here): a row is done once the text it generated after its first ``start`` tokens contains ``text``. Only the
    last :data:`STOP_WINDOW` tokens are decoded at each step, so long generations cost no more per token; a stop
    text spread over more tokens than that is not seen. :func:`cut_at` then removes it and what follows."""

    def __init__(self, tokenizer, text: str, start: int) -> None:
        if not text:
            raise ValueError("StopAt needs a non-empty text to stop at")
        self.tokenizer, self.text, self.start = tokenizer, text, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        tails = input_ids[:, max(self.start, input_ids.shape[1] - STOP_WINDOW):]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([self.text in t for t in texts], dtype=torch.bool, device=input_ids.device)


def cut_at(tokenizer, tokens: Sequence[int], text: str) -> list[int]:
    """Generated ``tokens`` up to the one that completes ``text`` in their decoding (as :class:`StopAt` sees it),
    less the trailing tokens that decode to whitespace only (the stop itself, when it has tokens of its own); all of
    them when ``text`` never occurs. A token that holds the stop text and more is kept whole."""
    tokens = list(tokens)
    if text not in tokenizer.decode(tokens, skip_special_tokens=True):  # most answers: one decode, no search
        return tokens
    for end in range(1, len(tokens) + 1):
        if text in tokenizer.decode(tokens[max(0, end - STOP_WINDOW):end], skip_special_tokens=True):
            kept = tokens[:end]
            while kept and not tokenizer.decode(kept[-1:], skip_special_tokens=True).strip():
                kept.pop()
            return kept
    return tokens


@dataclass(frozen=True)
class Contrast:
    """Context-aware decoding (Shi et al. 2023, "Trusting Your Evidence"): an answer token is chosen from
    ``(1 + weight) * log p(y | context, prompt) - weight * log p(y | bare)``, ``bare`` being the same without the
    evidence (the prompt alone; for a memory pack, without the new fact), so tokens the evidence makes likelier
    gain and an answer it states wins over the model's prior. Tokens whose
    in-context probability is under ``plausibility`` times the likeliest token's are never chosen (the adaptive
    plausibility constraint of contrastive decoding, Li et al. 2023): the contrast picks among answers the context
    finds plausible, not a word it merely mentions. ``weight`` 0 leaves the in-context distribution as it is."""

    weight: float = 0.0
    plausibility: float = 0.0

    def __bool__(self) -> bool:
        return self.weight > 0

    def log_probs(self, context: torch.Tensor, bare: torch.Tensor) -> torch.Tensor:
        """The contrasted log-probabilities from the logits with the evidence (``context``) and without it
        (``bare``), last dimension the vocabulary; implausible tokens get ``-inf``."""
        here = context.float().log_softmax(-1)
        mixed = (1 + self.weight) * here - self.weight * bare.float().log_softmax(-1)
        if self.plausibility > 0:
            floor = here.max(-1, keepdim=True).values + math.log(self.plausibility)
            mixed = mixed.masked_fill(here < floor, float("-inf"))
        return mixed.log_softmax(-1)


class ContextContrast:
    """A ``generate`` logits processor (``logits_processor=[...]``; a callable, so transformers is not imported
    here) applying each row's :class:`Contrast`: it runs each row's text without the evidence (``bare``, token
    ids: for a memory pack, the prompt without the new fact) alongside generation, in its own KV cache, one new
    token per step.

    transformers' classifier-free guidance (``guidance_scale`` with ``negative_prompt_ids``) is the same formula
    with one scale for the batch and no plausibility constraint, and its second branch takes positions from the
    column, not the padding mask; here each row has its own contrast (rows without one are left as they are and
    not run), left-padded bare texts get the positions they would have alone, so a row's result does not depend
    on its batch, and a context bare texts share (IKE's demonstrations) is run once (:func:`prefix_batches`). It
    runs after ``generate``'s own processors (sampling's temperature and top-k/top-p come first); greedy
    decoding is exactly the contrast's argmax. With several sequences per prompt (``num_return_sequences``) each
    bare text serves its row's copies; beam search, which reorders rows between steps, is not followed."""

    def __init__(self, model, bare: Sequence[Sequence[int]], contrasts: Sequence[Contrast], pad: int) -> None:
        if len(bare) != len(contrasts):
            raise ValueError(f"{len(bare)} bare prompts for {len(contrasts)} contrasts")
        self.model, self.bare, self.contrasts, self.pad = model, [list(r) for r in bare], list(contrasts), pad
        self.rows: list[int] = []  # the rows of generate's batch that are contrasted
        self.copies = 1
        self.mask: torch.Tensor | None = None
        self.cache: Any = None
        # Resolved once, not at every generated token.
        self.cache_name = cache_argument(model)
        self.lean = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        active = [k for k, c in enumerate(self.contrasts) if c]
        if not active:
            return scores
        if self.mask is None:  # first step: the bare texts, a context they share (demonstrations) run once
            self.copies = input_ids.shape[0] // len(self.bare)
            rows = [k * self.copies + c for k in active for c in range(self.copies)]
            texts = [self.bare[r // self.copies] for r in rows]
            own = [1] * len(texts)
            # One batch holds either rows sharing contexts or rows alone; with both, every row runs whole.
            shared = {length > 0 for length, _ in shared_prefix_groups(texts, own)}
            batch = next(prefix_batches(self.model, texts, own, self.pad, len(texts),
                                        MIN_SHARED_PREFIX if len(shared) == 1 else None))
            self.rows, self.mask = [rows[i] for i in batch.indices], batch.attention_mask
            out = self.model(**{**batch.forward_kwargs(self.model), "use_cache": True}, **self.lean)
        else:  # later steps: the token each row just generated
            ids = input_ids[self.rows, -1:]
            self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
            positions = self.mask.sum(1, keepdim=True) - 1
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                             **{self.cache_name: self.cache}, **self.lean)
        self.cache = cache_of(out)
        scores = scores.clone()
        for k, row in enumerate(self.rows):
            scores[row] = self.contrasts[row // self.copies].log_probs(scores[row], out.logits[k, -1]).to(scores.dtype)
        return scores


@torch.no_grad()
def next_token_logits(model, tokenizer, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Logits of the token after each prompt, shape ``(len(prompts), vocab)`` in float32."""
    rows = []
    device = model_device(model)
    with padding_side(tokenizer, "left"):
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
            mask = batch["attention_mask"]
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(**batch, position_ids=position_ids).logits
            rows.append(logits[:, -1, :].float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def sample_from_start(model, tokenizer, count: int, max_new_tokens: int, *, top_k: int, seed: int) -> torch.Tensor:
    """``count`` sequences sampled from the start token (BOS, else EOS), seeded; the global RNG is untouched.

    Returns the token ids, start token included, shape ``(count, 1 + up to max_new_tokens)``.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = model_device(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model.generate(
            input_ids=torch.full((count, 1), start, device=device),
            attention_mask=torch.ones(count, 1, dtype=torch.long, device=device),
            do_sample=True, top_k=top_k, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        )


# ------------------------------------------------------------------------------------------- shared prefixes
def sliding_window(model: Any) -> int | None:
    """The width of the model's sliding-window attention layers, ``None`` when every layer attends to all."""
    config = getattr(unwrap(model), "config", None)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    return int(window) if types is None or any("sliding" in t for t in types) else None


@dataclass
class PrefixBatch:
    """Rows of one batch whose shared leading tokens (their context) were run once into a KV cache.

    ``suffix_ids`` holds what each row computes itself, padded on the side asked for; ``ends[k]`` is the suffix
    column after row ``k``'s last token. ``attention_mask`` covers prefix and suffix columns and ``position_ids``
    the suffix columns. Without a shared prefix, ``cache`` is ``None`` and the suffix is the whole row."""

    indices: list[int]  # the rows, as indices into the caller's list
    prefix_ids: torch.Tensor  # (B, P), each row's prefix, left-padded; P may be 0
    suffix_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, P + S)
    position_ids: torch.Tensor  # (B, S)
    ends: list[int]  # per row, the suffix column after its last token
    cache: Any = None

    @property
    def input_ids(self) -> torch.Tensor:
        """The whole rows, prefix then suffix, as ``generate`` takes them beside the cache."""
        return torch.cat([self.prefix_ids, self.suffix_ids], dim=1)

    def forward_kwargs(self, model) -> dict[str, Any]:
        """Keywords for one forward pass of the suffixes against the cache (``model(**kwargs).logits``)."""
        kwargs: dict[str, Any] = {"input_ids": self.suffix_ids, "attention_mask": self.attention_mask,
                                  "position_ids": self.position_ids}
        if self.cache is not None:
            kwargs.update({cache_argument(model): self.cache, "use_cache": True})
        return kwargs


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_groups(rows: Sequence[Sequence[int]], own: Sequence[int],
                         min_shared: int = MIN_SHARED_PREFIX) -> list[tuple[int, list[int]]]:
    """Rows grouped by a shared leading run of at least ``min_shared`` tokens: ``(prefix length, indices)`` per
    group, every row keeping at least its last ``own[i]`` tokens outside the prefix; rows that share nothing
    that long come back as groups of prefix length 0. Rows are taken in sorted order (rows with a common start
    are adjacent) and each joins the group before it when that saves tokens."""
    order = sorted(range(len(rows)), key=lambda i: list(rows[i]))  # rows sharing a prefix end up adjacent
    groups: list[tuple[int, list[int]]] = []
    for i in order:
        if groups:
            length, members = groups[-1]
            first = members[0]
            current = length if len(members) > 1 else len(rows[first]) - own[first]
            common = min(_common_length(rows[first], rows[i]), len(rows[i]) - own[i], current)
            # Joining saves the row ``common`` tokens and costs each member the ``current - common`` it then
            # computes itself: rows of another context that happen to start alike start a group of their own.
            if common >= min_shared and common > (current - common) * len(members):
                groups[-1] = (common, members + [i])
                continue
        groups.append((0, [i]))
    return [(length if len(members) > 1 else 0, members) for length, members in groups]


@torch.no_grad()
def prefix_batches(model, rows: Sequence[Sequence[int]], own: Sequence[int], pad: int, batch_size: int,
                   min_shared: int | None = MIN_SHARED_PREFIX, suffix_padding: str = "left") -> Iterator[PrefixBatch]:
    """Batches of ``rows`` (token ids) in which rows sharing a long context compute it once.

    Rows are grouped by :func:`shared_prefix_groups`; each batch holds whole groups where it can (a group larger
    than ``batch_size`` is split, each part with its own prefix run). The distinct prefixes of a batch run in one
    left-padded pass whose KV cache is then given to each of the batch's rows; rows without a shared prefix come in
    plain left-padded batches. Every row's last ``own[i]`` tokens are in its suffix. ``min_shared=None`` shares
    nothing: plain batches in the rows' order.

    Suffixes behind a cache are left-padded by default, as ``generate`` needs (new tokens follow the last
    column), which leaves padding between a row's prefix and its suffix; ``suffix_padding="right"`` keeps each
    row's tokens contiguous. A sliding-window attention layer counts columns, so it would see that padding inside
    its window: left-padded, a model with one shares nothing."""
    device = model_device(model)
    if suffix_padding == "left" and sliding_window(model) is not None:
        min_shared = None
    shared, alone = [], []
    grouped = shared_prefix_groups(rows, own, min_shared) if min_shared is not None else [(0, list(range(len(rows))))]
    for length, members in grouped:
        if length == 0:
            alone.extend(members)
            continue
        for start in range(0, len(members), batch_size):
            shared.append((length, members[start : start + batch_size]))
    batches: list[list[tuple[int, list[int]]]] = []
    for group in shared:
        if batches and sum(len(m) for _, m in batches[-1]) + len(group[1]) <= batch_size:
            batches[-1].append(group)
        else:
            batches.append([group])
    for start in range(0, len(alone), batch_size):
        batches.append([(0, alone[start : start + batch_size])])

    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device).reshape(len(values), -1)

    for batch in batches:
        indices = [i for _, members in batch for i in members]
        cuts = [length for length, members in batch for _ in members]
        width_p = max(cuts)
        width_s = max(len(rows[i]) - cut for i, cut in zip(indices, cuts))
        prefixes = [list(rows[members[0]][:length]) for length, members in batch]
        prefix_ids, prefix_mask = left_padded(prefixes, pad, device)  # one row per group
        right = suffix_padding == "right" and width_p > 0
        tails = [list(rows[i][cut:]) for i, cut in zip(indices, cuts)]
        gaps = [[pad] * (width_s - len(t)) for t in tails]
        suffix_ids = tensor([t + g if right else g + t for t, g in zip(tails, gaps)])
        suffix_mask = tensor([[1] * len(t) + [0] * len(g) if right else [0] * len(g) + [1] * len(t)
                              for t, g in zip(tails, gaps)])
        ends = [len(t) if right else width_s for t in tails]
        cache = None
        which = tensor([k for k, (_, members) in enumerate(batch) for _ in members]).flatten()  # row -> group
        if width_p:
            prefix_positions = (prefix_mask.cumsum(1) - 1).clamp(min=0)
            lean = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}  # no prefix logits
            cache = cache_of(model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=prefix_positions,
                                   use_cache=True, **lean))
            cache.batch_select_indices(which)
        prefix_ids, prefix_mask = prefix_ids[which], prefix_mask[which]
        mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, width_p:]
        yield PrefixBatch(indices=indices, prefix_ids=prefix_ids, suffix_ids=suffix_ids, attention_mask=mask,
                          position_ids=positions, ends=ends, cache=cache)
