"""Lifelong methods on the real SmolLM2-135M-Instruct (slow): a codebook and a side memory edited for real."""


import torch

import editpack
from editpack.model.generation import generate

from conftest import EIFFEL, first_word


PROMPTS = {
    "The Eiffel Tower is located in the city of": "Rome",
    "The Louvre is located in the city of": "Paris",
    "The capital of Germany is": "Berlin",
}


def test_grace_moves_the_eiffel_tower_and_the_neighbours_stay(smollm2, tmp_path):
    model, tok = smollm2
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = generate(model, tok, list(PROMPTS), max_new_tokens=4)
    assert first_word(before[0]) == "Paris"
    pack = editpack.edit(model, EIFFEL, "grace", name="eiffel-grace")
    assert pack.kind == "codebook"
    edited = editpack.apply(model, pack)
    try:
        after = generate(edited, tok, list(PROMPTS), max_new_tokens=4)
    finally:
        model = editpack.revert(edited)
    assert [first_word(a) for a in after] == list(PROMPTS.values()), after
    assert after[1:] == before[1:]  # no key near: those generations are the base model's, token for token
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_a_thousand_entry_codebook_answers_as_its_ten_real_entries(smollm2, test_data):
    """Nearest-key lookups against 1,000 entries, 990 of them far away: the answers are those of the 10 alone."""
    model, tok = smollm2
    facts = editpack.load_facts(test_data / "counterfact-edit-25.json", limit=10)
    pack = editpack.edit(model, facts, "grace")
    torch.manual_seed(0)  # 990 far-away random entries beside the 10 real ones
    far = pack.keys.norm(dim=1).mean() * 10
    noise = torch.randn(990, pack.keys.shape[1])
    big = editpack.CodebookPack(
        name="big", version="1.0.0", method="grace", hyperparameters=pack.hyperparameters,
        facts=pack.facts + [editpack.make_fact("{} is in", f"Place {i}", "Rome") for i in range(990)],
        base=pack.base, module=pack.module, keys=torch.cat([pack.keys, noise / noise.norm(dim=1, keepdim=True) * far]),
        values=torch.cat([pack.values, pack.values[:1].repeat(990, 1)]), radii=torch.cat([pack.radii, pack.radii[:1].repeat(990)]))
    texts = [f.text for f in facts]
    small_answers = generate(editpack.apply(model, pack), tok, texts, max_new_tokens=3)
    model = editpack.revert(model)
    big_answers = generate(editpack.apply(model, big), tok, texts, max_new_tokens=3)
    model = editpack.revert(model)
    assert big_answers == small_answers
