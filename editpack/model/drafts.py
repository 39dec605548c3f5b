"""Greedy continuations checked against guesses (drafts) of them: one teacher-forced forward tells, for every
row, how much of its draft the model would have generated itself, so only the rest need be decoded."""

from __future__ import annotations

import torch

from .batches import forward_parameters, left_padded, model_device
from .fingerprint import memory_wrapper, unwrap

#: Generation settings under which a decoding step is not the argmax of the model's logits (processors, beam and
#: contrastive search): with any of them set to other than these values, drafts are not checked but decoded.
_NEUTRAL_PROCESSING = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
                       "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
                       "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
                       "forced_eos_token_id": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
                       "sequence_bias": (None,), "renormalize_logits": (None, False),
                       "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
                       "watermarking_config": (None,), "num_beams": (None, 1), "penalty_alpha": (None,),
                       "dola_layers": (None,)}


def verifiable(model) -> bool:
    """Whether ``model``'s greedy continuations can be confirmed by teacher forcing: its ``generate`` is
    transformers' own (not a memory pack's wrapper, nor a model that orders its prompts) and its generation
    config changes no greedy step (no repetition penalty, no forced or suppressed tokens)."""
    if memory_wrapper(model) is not None or callable(getattr(model, "generation_order", None)):
        return False
    config = getattr(unwrap(model), "generation_config", None)
    return all(getattr(config, name, None) in neutral for name, neutral in _NEUTRAL_PROCESSING.items())


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a greedy generation (the generation config's, else the tokenizer's EOS)."""
    found = getattr(getattr(unwrap(model), "generation_config", None), "eos_token_id", None)
    if found is None:
        found = tokenizer.eos_token_id
    return set() if found is None else {int(found)} if isinstance(found, int) else {int(x) for x in found}


@torch.no_grad()
def check(model, prompts: list[list[int]], drafts: list[list[int]], limits: list[int], eos: set[int], pad: int,
          batch_size: int, first_logits: bool = False) -> tuple[list[list[int]], torch.Tensor | None]:
    """Each prompt followed by its draft in one teacher-forced forward (left-padded batches): the draft's tokens
    the model itself predicts greedily, up to the first it does not, then the model's own token there (cut at
    an end token and at the row's limit). With ``first_logits``, also the first step's logits of every row
    (float32; ``None`` without)."""
    keeps_some = "logits_to_keep" in forward_parameters(model)
    out: list[list[int]] = [[] for _ in prompts]
    first: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(drafts[i]))  # like lengths together
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = left_padded([prompts[i] + drafts[i] for i in chunk], pad, device)
        keep = max(len(drafts[i]) for i in chunk) + 1
        kwargs = {"logits_to_keep": keep} if keeps_some else {}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       use_cache=False, **kwargs).logits[:, -keep:]
        predicted = logits.argmax(dim=-1).tolist()
        for k, i in enumerate(chunk):
            draft = drafts[i]
            at = keep - len(draft) - 1  # the column of the prompt's last token
            if first_logits:
                first[i] = logits[k, at].float().cpu()
            own = predicted[k][at : at + len(draft) + 1]
            taken = 0
            while taken < len(draft) and own[taken] == draft[taken]:
                taken += 1
            row = draft[:taken] + [own[taken]]
            ends = next((j for j, token in enumerate(row) if token in eos), None)
            out[i] = row[: (len(row) if ends is None else ends + 1)][: limits[i]]
    if not first_logits:
        return out, None
    return out, torch.stack(first) if first else torch.empty(0)
