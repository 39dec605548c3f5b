"""Text the model writes itself: ROME's context prefixes (sampled once and remembered on the model object) and
unrelated texts."""

from __future__ import annotations

from typing import Sequence

from ...model.generation import sample_from_start


def sample_context_templates(model, tokenizer, lengths: Sequence[Sequence[int]], seed: int) -> list[str]:
    """ROME's context prefixes: short texts the model samples (top-k 5), each followed by ``". {}"``."""
    templates = ["{}"]
    for index, (length, count) in enumerate(lengths):
        out = sample_from_start(model, tokenizer, count, length, top_k=5, seed=seed + index)
        for text in tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True):
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            templates.append(f"{text}. {{}}")
    return templates


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
