"""Batched greedy generation and next-token helpers (left padding, done right for every tokenizer)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


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


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str] | str,
    *,
    max_new_tokens: int = 20,
    batch_size: int = 16,
) -> list[str] | str:
    """Greedy continuations of ``prompts`` (only the new text). A single string in gives a single string out."""
    single = isinstance(prompts, str)
    items = [prompts] if single else list(prompts)
    outputs: list[str] = []
    device = model_device(model)
    with padding_side(tokenizer, "left"):
        for start in range(0, len(items), batch_size):
            batch = tokenizer(items[start : start + batch_size], return_tensors="pt", padding=True).to(device)
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = generated[:, batch["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return outputs[0] if single else outputs


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
