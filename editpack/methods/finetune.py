"""The training loop the fine-tuning baselines share: NLL of the new target's tokens only (prompt masked)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..facts import Fact
from ..generation import model_device, pad_id


def target_batch(tokenizer, facts: Sequence[Fact], device) -> dict[str, torch.Tensor]:
    """Prompt + `` target`` per fact, right-padded, with labels only on the target's tokens (FT-M's mask)."""
    rows, labels = [], []
    for fact in facts:
        prompt = tokenizer(fact.text)["input_ids"]
        target = tokenizer(" " + fact.target_new, add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError(f"target {fact.target_new!r} tokenizes to nothing")
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    pad = pad_id(tokenizer)
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels], device=device)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def masked_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL of the labelled (target) tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100)


def train(model, tokenizer, facts: Sequence[Fact], params: list[torch.Tensor], *, steps: int, lr: float,
          batch_size: int, early_stop_loss: float, seed: int) -> float:
    """Adam on ``params`` for ``steps`` passes over ``facts`` (in batches); returns the last mean loss."""
    device = model_device(model)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    with torch.enable_grad():
        for _ in range(steps):
            order = torch.randperm(len(facts), generator=generator).tolist()
            losses = []
            for start in range(0, len(order), batch_size):
                batch = target_batch(tokenizer, [facts[i] for i in order[start : start + batch_size]], device)
                optimizer.zero_grad()
                loss = masked_nll(model, batch)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            loss_value = sum(losses) / len(losses)
            if loss_value < early_stop_loss:
                break
    return loss_value
