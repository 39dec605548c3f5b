"""Teacher-forced batches of facts: each prompt followed by its new target, and the positions that predict it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..facts import Fact
from ..generation import pad_id


@dataclass
class TargetBatch:
    """``inputs`` (right-padded ``input_ids`` / ``attention_mask``) and, for every target token, the row and the
    column that predicts it, the token, and ``1 / len(target)`` (so each fact's loss is its mean NLL)."""

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor
    cols: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor

    def logits(self, model) -> torch.Tensor:
        """The model's logits at the positions that predict the targets, ``(target tokens, vocab)``."""
        return model(**self.inputs).logits[self.rows, self.cols]

    def token_nll(self, logits_at: torch.Tensor) -> torch.Tensor:
        """The mean NLL over every target token of the batch (FT-M's masked loss)."""
        return torch.nn.functional.cross_entropy(logits_at.float(), self.tokens)

    def nll(self, logits_at: torch.Tensor) -> torch.Tensor:
        """The sum over facts of each fact's mean NLL, from the logits at ``(rows, cols)``."""
        return (torch.nn.functional.cross_entropy(logits_at.float(), self.tokens, reduction="none") * self.weights).sum()


def target_batch(tokenizer, facts: Sequence[Fact], device) -> TargetBatch:
    rows, positions, labels = [], [], []
    for f, fact in enumerate(facts):
        prompt = tokenizer(fact.text)["input_ids"]
        target = tokenizer(" " + fact.target_new, add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError(f"target {fact.target_new!r} tokenizes to nothing")
        rows.append(prompt + target)
        for j, token in enumerate(target):
            positions.append((f, len(prompt) - 1 + j))
            labels.append((token, len(target)))
    pad, width = pad_id(tokenizer), max(map(len, rows))
    return TargetBatch(
        inputs={"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)},
        rows=torch.tensor([p[0] for p in positions], device=device),
        cols=torch.tensor([p[1] for p in positions], device=device),
        tokens=torch.tensor([t for t, _ in labels], device=device),
        weights=torch.tensor([1.0 / n for _, n in labels], device=device),
    )
