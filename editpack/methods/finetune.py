"""The training loop the fine-tuning baselines share: NLL of the new target's tokens only (prompt masked)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..facts import Fact
from ..model.generation import model_device
from .targets import target_batch


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
                loss = batch.token_nll(batch.logits(model))
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            loss_value = sum(losses) / len(losses)
            if loss_value < early_stop_loss:
                break
    return loss_value
