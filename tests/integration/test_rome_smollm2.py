"""ROME on the real SmolLM2-135M-Instruct (slow): the edits the product promises, measured for real."""

import torch
from peft import PeftModel

import editpack
from editpack.model.generation import generate, next_token_logits


from conftest import EIFFEL, first_word


def test_eiffel_tower_moves_to_rome_and_neighbours_stay(smollm2, eiffel):
    model, tok = smollm2
    prompts = {
        "The Eiffel Tower is located in the city of": "Rome",
        "The Eiffel Tower can be found in the city of": "Rome",  # paraphrase, not edited directly
        "The Louvre is located in the city of": "Paris",
        "The capital of Germany is": "Berlin",
    }
    before = generate(model, tok, list(prompts), max_new_tokens=4)
    assert first_word(before[0]) == "Paris"
    edited = editpack.apply(model, editpack.EditPack.load(eiffel))
    try:
        after = generate(edited, tok, list(prompts), max_new_tokens=4)
    finally:
        model = editpack.revert(edited)
    assert [first_word(a) for a in after] == list(prompts.values()), after


def test_plain_peft_matches_apply_and_revert_is_exact(smollm2, eiffel):
    model, tok = smollm2
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [EIFFEL["prompt"], "The capital of Germany is"]
    ours = next_token_logits(editpack.apply(model, editpack.EditPack.load(eiffel)), tok, prompts)
    model = editpack.revert(model if not isinstance(model, PeftModel) else model)
    peft_model = PeftModel.from_pretrained(model, str(eiffel))
    theirs = next_token_logits(peft_model, tok, prompts)
    model = editpack.revert(peft_model)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    merged = editpack.apply(model, editpack.EditPack.load(eiffel), merge=True)
    torch.testing.assert_close(next_token_logits(merged, tok, prompts), ours, rtol=1e-4, atol=1e-4)
    model = editpack.revert(merged)
    now = model.state_dict()
    assert all(torch.equal(now[k], original[k]) for k in original)


def test_twenty_counterfact_records_one_at_a_time(smollm2, corpus, test_data):
    model, tok = smollm2
    facts = editpack.load_facts(test_data / "counterfact-edit-25.json", limit=20)
    hits = []
    for fact in facts:
        pack = editpack.edit(model, fact, stats_corpus=corpus)  # edit() leaves the model as it was
        target = tok(" " + fact.target_new, add_special_tokens=False)["input_ids"][0]
        edited = editpack.apply(model, pack)
        hits.append(int(next_token_logits(edited, tok, [fact.text])[0].argmax()) == target)
        model = editpack.revert(edited)
    print(f"CounterFact top-1 after edit: {sum(hits)}/20")
    assert sum(hits) >= 18, hits


def test_eiffel_pack_evaluation_lands_in_manifest_and_card(smollm2, eiffel, tmp_path):
    import json
    import shutil

    from editpack.evaluation.report import evaluate_pack

    model, tok = smollm2
    path = tmp_path / "eiffel"
    shutil.copytree(eiffel, path)
    pack = editpack.EditPack.load(path)
    facts = [editpack.make_fact(EIFFEL["prompt"], EIFFEL["subject"], "Rome", "Paris",
                                paraphrases=["The Eiffel Tower can be found in the city of"],
                                neighborhood=[("The Louvre is located in the city of", "Paris"),
                                              ("The capital of Germany is", "Berlin")])]
    result = evaluate_pack(model, tok, pack, facts, data="eiffel probes")
    pc, gm = result["protocols"]["prob_compare"], result["protocols"]["generate_match"]
    assert pc["reliability"] == {"before": 0.0, "after": 1.0, "n": 1}
    assert gm["reliability"]["after"] == 1.0 and gm["generalization"]["after"] == 1.0
    assert gm["locality"]["after"] == 1.0 and pc["locality"]["after"] == 1.0
    pack.evaluation = result
    pack.save(path, overwrite=True)
    manifest = json.loads((path / "editpack.json").read_text())
    card = (path / "README.md").read_text()
    assert manifest["evaluation"]["protocols"]["prob_compare"]["reliability"]["after"] == 1.0
    assert "| reliability | 0.0 | 100.0 | 1 |" in card
