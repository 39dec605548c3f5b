"""Token-id batches for a model: padding, the device inputs go to, the keywords its ``forward`` takes, and rows
grouped by how many steps they decode."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Sequence

import torch

from .fingerprint import unwrap


@contextlib.contextmanager
def padding_side(tokenizer, side: str) -> Iterator[None]:
    """Temporarily set the tokenizer's padding side (restored afterwards, also on error)."""
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = old


def pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def model_device(model: torch.nn.Module) -> torch.device:
    """The device inputs should go to (the embedding's device for dispatched models)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and hasattr(embed, "weight") and embed.weight.device.type != "meta":
        return embed.weight.device
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def forward_parameters(module: Any) -> set[str]:
    """The keywords the transformers model under any PEFT or memory wrapper takes in ``forward``."""
    return set(inspect.signature(unwrap(module).forward).parameters)


def cache_argument(module: Any) -> str:
    """The keyword a model's ``forward`` and ``generate`` take the KV cache under: ``cache`` in newer
    transformers, ``past_key_values`` before (in transformers 5 a deprecated alias that warns). Looks through PEFT
    and memory wrappers, whose ``forward`` passes keywords on."""
    return "cache" if "cache" in forward_parameters(module) else "past_key_values"


def cache_of(output: Any) -> Any:
    """The KV cache a forward pass returned, under either name."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def left_padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` of token ids as one left-padded batch: ``(input_ids, attention_mask)``."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def length_batches(order: Sequence[int], limits: Sequence[int], batch_size: int, split: bool) -> list[list[int]]:
    """``order``'s rows (longest ``limits`` first) in batches of at most ``batch_size``. With ``split`` (on a CPU,
    where a decoding step costs more the more rows it holds: on 2 cores a step of 2 rows takes 1.5 times one of
    a single row), a row that needs at most half the steps of its batch's longest starts a batch of its own
    rather than being decoded for the longest one's steps; on an accelerator a step costs about the same for any
    of these batch sizes, and rows share batches."""
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and not (split and 2 * limits[i] <= limits[batches[-1][0]]):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
