"""The tests' tiny models (from :mod:`editpack.testing`, where every method's tiny settings are written for) and two
helpers of the tests' own."""

from __future__ import annotations

import torch

from editpack.testing import FACT, TINY_LOCATE, WORDS, tiny_config, tiny_model, tiny_tokenizer

#: ROME-style settings for the tiny models (:data:`editpack.testing.TINY_LOCATE`).
TINY = TINY_LOCATE

__all__ = ["FACT", "TINY", "WORDS", "logits", "state", "tiny_config", "tiny_model", "tiny_tokenizer"]


def logits(model, tok, text):
    """Next-token logits after ``text``."""
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0, -1]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
