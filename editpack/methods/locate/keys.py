"""Where the subject sits in a prompt, and what a module reads or writes there: the keys of locate-then-edit
methods (a module's input at the subject's last token, averaged over context prefixes) and the lookups that
place an edit prompt after those prefixes."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...facts import Fact
from ...model.generation import model_device, padding_side
from ...model.nethook import Trace


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
