"""Teacher-forced scoring: the log-probabilities of answers after their prompts, batched with shared prefixes
computed once, as a model with memory packs would generate them (its ``teacher_forcing``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .generation import MIN_SHARED_PREFIX, Contrast, continuation_ids, model_device, pad_id, prefix_batches


# ------------------------------------------------------------------------------------------- scoring primitives
@dataclass
class Scored:
    """Teacher-forced scores of one (prompt, answer) pair."""

    nll: float  # mean per-token negative log-likelihood of the answer
    predictions: list[int]  # argmax token at each answer position
    answer: list[int]

    @property
    def token_acc(self) -> float:
        return sum(p == a for p, a in zip(self.predictions, self.answer)) / len(self.answer)


def answer_ids(tokenizer, answer: str, after: str = "") -> list[int]:
    """An answer's token ids as teacher-forced scoring reads them after the prompt ``after`` (stripped, then as
    its continuation)."""
    return continuation_ids(tokenizer, answer.strip(), "answer", after)


@torch.no_grad()
def score(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[Scored]:
    """Teacher-forced NLL and argmax predictions of each answer after its prompt (batched, left padded).

    A model with memory packs scores as it generates (its ``teacher_forcing``): in-scope prompts in their memory's
    context, answer tokens that its route forces have probability one when the answer has them there and
    zero (NLL infinite) when it does not, the forced token being the prediction, and a memory decoding with a
    contrast scores each answer token from its :class:`editpack.model.generation.Contrast`, against the distribution
    after the same text without the new fact (``Seen.bare``, computed too)."""
    pad = pad_id(tokenizer)
    forced: list[list[int]] = [[] for _ in pairs]
    contrasts = [Contrast()] * len(pairs)
    bare = [p for p, _ in pairs]
    routed = getattr(model, "teacher_forcing", None)
    if callable(routed) and pairs:
        seen = routed(bare)
        pairs = [(s.text, answer) for s, (_, answer) in zip(seen, pairs)]
        forced, contrasts, bare = [s.forced for s in seen], [s.contrast for s in seen], [s.bare for s in seen]
    answers = [answer_ids(tokenizer, answer, prompt) for prompt, answer in pairs]
    rows = [tokenizer(prompt)["input_ids"] + ids for (prompt, _), ids in zip(pairs, answers)]
    # A contrast's other side: the answer's log-probabilities after the text without the new fact.
    contrasted = [i for i, contrast in enumerate(contrasts) if contrast]
    against = {contrasted[k]: log_probs for k, log_probs in answer_log_probs(
        model, [tokenizer(bare[i])["input_ids"] + answers[i] for i in contrasted], [answers[i] for i in contrasted],
        pad, batch_size, MIN_SHARED_PREFIX)}
    out: list[Scored | None] = [None] * len(pairs)
    # In-context rows (a memory's fact, IKE's demonstrations) share their context: it is computed once per batch.
    for i, log_probs in answer_log_probs(model, rows, answers, pad, batch_size,
                                         MIN_SHARED_PREFIX if callable(routed) else None):
        if i in against:
            log_probs = contrasts[i].log_probs(log_probs, against.pop(i))
        ids = answers[i]
        lp = log_probs[torch.arange(len(ids)), torch.tensor(ids, device=log_probs.device)]
        predictions = log_probs.argmax(-1).tolist()
        kept = forced[i][: len(ids)]
        if kept:
            lp = lp.clone()
            lp[: len(kept)] = torch.tensor([0.0 if a == f else float("-inf") for a, f in zip(ids, kept)],
                                           device=lp.device)
            predictions[: len(kept)] = kept
        out[i] = Scored(nll=float(-lp.mean()), predictions=predictions, answer=ids)
    return out


def answer_log_probs(model, rows: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad: int,
                     batch_size: int, min_shared: int | None) -> Iterator[tuple[int, torch.Tensor]]:
    """For each row (prompt tokens then its answer's), the log-probabilities over the vocabulary at the positions
    predicting its answer tokens, shape ``(len(answer), vocab)``, as ``(index, log_probs)`` in batch order; rows
    sharing ``min_shared`` leading tokens or more compute them once (``None``: plain batches)."""
    device = model_device(model)
    for batch in prefix_batches(model, rows, [len(a) + 1 for a in answers], pad, batch_size,
                                min_shared=min_shared, suffix_padding="right"):
        logits = model(**batch.forward_kwargs(model)).logits
        for k, i in enumerate(batch.indices):
            n, end = len(answers[i]), batch.ends[k]
            cols = torch.arange(end - n - 1, end - 1, device=device)  # the positions predicting the answer
            yield i, torch.log_softmax(logits[k, cols].float(), dim=-1)  # its own tensor: the batch's can go
