"""Stacking, quantized application and pipelines on the real SmolLM2-135M-Instruct (slow)."""

import copy

import pytest
import torch

import editpack
from editpack.errors import PackConflictError
from editpack.model.generation import generate, next_token_logits

from conftest import EIFFEL, first_word


COLOSSEUM = {"prompt": "The Colosseum is located in the city of", "subject": "Colosseum",
             "target_new": "London", "target_true": "Rome"}
PROMPTS = [EIFFEL["prompt"], COLOSSEUM["prompt"], "The Louvre is located in the city of", "The capital of Germany is"]


@pytest.fixture(scope="module")
def colosseum(smollm2, corpus):
    model, _ = smollm2
    return editpack.edit(model, COLOSSEUM, stats_corpus=corpus, name="colosseum-london")


def top1(model, tok, prompts):
    return [tok.decode(i).strip() for i in next_token_logits(model, tok, prompts).argmax(-1)]


def stacked_vs_both(model, tok, packs):
    """Logits with the packs as separate adapters, and with their stack as one adapter."""
    both = editpack.apply(model, packs)
    try:
        separate = next_token_logits(both, tok, PROMPTS)
    finally:
        model = editpack.revert(both)
    stacked = editpack.apply(model, editpack.stack(packs))
    try:
        return separate, next_token_logits(stacked, tok, PROMPTS)
    finally:
        editpack.revert(stacked)


def test_two_packs_hold_together_and_equal_their_stack(smollm2, eiffel, colosseum):
    model, tok = smollm2
    tower = editpack.EditPack.load(eiffel)
    assert top1(model, tok, PROMPTS[:2]) == ["Paris", "Rome"]
    separate, stacked = stacked_vs_both(model, tok, [tower, colosseum])
    assert [tok.decode(i).strip() for i in separate.argmax(-1)] == ["Rome", "London", "Paris", "Berlin"]
    # Two rank-1 adds versus one rank-2 matmul round differently; 25 layers on, float32 logits (|x| up to ~30)
    # differ by up to ~2e-5. In float64 the two are equal to 1e-9: the deltas are the same sum exactly.
    torch.testing.assert_close(stacked, separate, rtol=1e-5, atol=5e-5)
    double = copy.deepcopy(model).double()
    separate64, stacked64 = stacked_vs_both(double, tok, [tower, colosseum])
    torch.testing.assert_close(stacked64, separate64, rtol=0, atol=1e-9)


def test_conflicting_pair_is_refused(smollm2, eiffel, corpus):
    model, _ = smollm2
    rival = editpack.edit(model, {**EIFFEL, "target_new": "Berlin"}, stats_corpus=corpus, name="eiffel-berlin")
    with pytest.raises(PackConflictError, match="Eiffel Tower is located in the city of' -> 'Rome'.*'Berlin'"):
        editpack.apply(model, [editpack.EditPack.load(eiffel), rival])
    assert not editpack.applied(model)


@pytest.mark.parametrize("bits", [8, 4])
def test_eiffel_pack_holds_on_quantized_model(eiffel, bits):
    model, tok = editpack.load_model("smollm2-135m", **{f"load_in_{bits}bit": True})
    assert top1(model, tok, [EIFFEL["prompt"]]) == ["Paris"]
    edited = editpack.apply(model, eiffel)
    assert top1(edited, tok, [EIFFEL["prompt"], "The capital of Germany is"]) == ["Rome", "Berlin"]
    with pytest.raises(editpack.EditpackError, match="quantized"):
        editpack.apply(editpack.revert(edited), eiffel, merge=True)


def test_pipeline_completes_the_edited_prompt(smollm2, eiffel):
    model, tok = smollm2
    pipe = editpack.pipeline(model, [eiffel], tokenizer=tok)
    try:
        out = pipe([EIFFEL["prompt"], "The capital of Germany is"], max_new_tokens=4, do_sample=False,
                   return_full_text=False)
        assert [first_word(o[0]["generated_text"]) for o in out] == ["Rome", "Berlin"], out
    finally:
        editpack.revert(pipe.model)
    assert first_word(generate(model, tok, EIFFEL["prompt"], max_new_tokens=3)) == "Paris"
