"""Greedy generation checked against drafts: the answers are the model's own whatever the drafts are, and a draft
the model agrees with is confirmed by one forward instead of being decoded."""

from __future__ import annotations

import pytest
import torch

from editpack.model import generation
from editpack.model.generation import generate, generate_with_first_logits, verifiable

from tiny import tiny_model, tiny_tokenizer

PROMPTS = ["the famous eiffel tower is located in", "the louvre is in the city of", "rome is the capital of",
           "he speaks", "the old bridge on the river", "what is"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    return tiny_model("llama").eval(), tiny_tokenizer()


def counting(monkeypatch, model):
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(k["input_ids"].shape) or real(*a, **k))
    return calls


@pytest.mark.parametrize("limits", [6, [6, 2, 9, 1, 6, 4]])
def test_own_answers_as_drafts_are_confirmed_without_decoding(model_and_tokenizer, monkeypatch, limits):
    model, tok = model_and_tokenizer
    plain, first = generate_with_first_logits(model, tok, PROMPTS, max_new_tokens=limits, batch_size=4)
    # the random model also generates ids the word-level tokenizer has no text for: such an answer's text is not
    # its tokens, so its draft is right only up to there and the rest is decoded
    sizes = limits if isinstance(limits, list) else [limits] * len(PROMPTS)
    ids, _ = generation._decode(model, tok, [tok(p)["input_ids"] for p in PROMPTS], sizes, 4, False)
    lossy = sum(tok(text, add_special_tokens=False)["input_ids"] != row for text, row in zip(plain, ids))
    assert lossy < len(PROMPTS)
    calls = counting(monkeypatch, model)
    checked, first_checked = generate_with_first_logits(model, tok, PROMPTS, max_new_tokens=limits, batch_size=4,
                                                        drafts=plain)
    assert checked == plain
    torch.testing.assert_close(first_checked, first, atol=1e-5, rtol=1e-5)
    assert sum(shape[0] for shape in calls) == lossy  # nothing else left to decode


def test_wrong_partial_and_missing_drafts_give_the_same_answers(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    plain = generate(model, tok, PROMPTS, max_new_tokens=7, batch_size=4)
    half = " ".join(plain[1].split()[:3] + ["piano", "piano"])
    drafts = ["berlin berlin berlin", half, None, "", plain[4] + " tower tower", plain[5]]
    calls = counting(monkeypatch, model)
    assert generate(model, tok, PROMPTS, max_new_tokens=7, batch_size=4, drafts=drafts) == plain
    # only the prompts whose drafts were not all right are decoded, from where they departed
    assert sum(shape[0] for shape in calls) <= 5


def test_drafts_must_match_the_prompts(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="2 drafts for 6 prompts"):
        generate(model, tok, PROMPTS, drafts=["a", "b"])


def test_a_generation_config_that_changes_greedy_steps_is_decoded(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    assert verifiable(model)
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.5)
    assert not verifiable(model)
    plain = generate(model, tok, PROMPTS, max_new_tokens=6)
    monkeypatch.setattr(generation, "check", lambda *a, **k: pytest.fail("verified under a repetition penalty"))
    assert generate(model, tok, PROMPTS, max_new_tokens=6, drafts=plain) == plain


def test_a_model_that_orders_its_prompts_is_decoded(model_and_tokenizer, monkeypatch):
    model, _ = model_and_tokenizer
    monkeypatch.setattr(model, "generation_order", lambda prompts: range(len(prompts)), raising=False)
    assert not verifiable(model)


def test_rows_of_unlike_lengths_are_decoded_apart_on_a_cpu():
    from editpack.model.generation import length_batches

    limits = [60, 24, 24, 59, 31, 30]
    order = sorted(range(len(limits)), key=lambda i: -limits[i])
    assert length_batches(order, limits, 16, split=True) == [[0, 3, 4], [5, 1, 2]]
    assert length_batches(order, limits, 2, split=True) == [[0, 3], [4, 5], [1, 2]]
    assert length_batches(order, limits, 16, split=False) == [order]


def test_split_batches_give_each_row_its_own_continuation(model_and_tokenizer):
    model, tok = model_and_tokenizer
    limits = [9, 2, 9, 1, 4, 3]
    mixed = generate(model, tok, PROMPTS, max_new_tokens=limits, batch_size=8)
    assert mixed == [generate(model, tok, p, max_new_tokens=n) for p, n in zip(PROMPTS, limits)]
