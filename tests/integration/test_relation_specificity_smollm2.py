"""Relation specificity on the real SmolLM2 (slow): the retention term keeps the Eiffel Tower's other relations."""

import torch

import editpack
from editpack import relations
from editpack.evaluation.protocols import SAME_SUBJECT, normalise
from editpack.model.generation import generate, next_token_logits

from conftest import EIFFEL, first_word


def test_retention_keeps_more_of_the_subjects_other_relations(smollm2, eiffel, corpus):
    model, tok = smollm2
    fact = editpack.make_fact(EIFFEL["prompt"], EIFFEL["subject"], EIFFEL["target_new"], EIFFEL["target_true"])
    asked = relations.same_subject_prompts(fact, SAME_SUBJECT)
    kept = [t.replace("{}", fact.subject) for t in relations.retention_prompts(fact, 12)]
    assert not set(asked) & set(kept)
    before = generate(model, tok, asked, max_new_tokens=8)
    base = torch.log_softmax(next_token_logits(model, tok, kept), -1)
    packs = {0.0: editpack.EditPack.load(eiffel),
             1.0: editpack.edit(model, EIFFEL, stats_corpus=corpus, retain_factor=1.0)}
    changed, kl = {}, {}
    for factor, pack in packs.items():
        edited = editpack.apply(model, pack)
        try:
            assert first_word(generate(edited, tok, EIFFEL["prompt"], max_new_tokens=3)) == "Rome"
            after = generate(edited, tok, asked, max_new_tokens=8)
            logp = torch.log_softmax(next_token_logits(edited, tok, kept), -1)
        finally:
            model = editpack.revert(edited)
        changed[factor] = sum(first_word(normalise(a)) != first_word(normalise(b)) for a, b in zip(before, after))
        kl[factor] = float((base.exp() * (base - logp)).sum(-1).mean())
    print(f"Eiffel Tower, other relations' first words changed of {len(asked)}: {changed}; retained KL {kl}")
    assert kl[1.0] < 0.5 * kl[0.0], kl
    assert changed[1.0] <= changed[0.0], changed
