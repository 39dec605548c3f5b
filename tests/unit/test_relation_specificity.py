"""Relation specificity: the subject's other relations measured in every benchmark, and the retention term of the
locate-then-edit value optimisation (what it keeps, what it leaves out, that it is never what is measured)."""

from __future__ import annotations

import torch

import editpack
from editpack import relations
from editpack.evaluation.protocols import SAME_SUBJECT, measure, protocol_scores
from editpack.methods.locate import values
from editpack.methods import REGISTRY
from editpack.methods.locate.model_state import frozen
from editpack.methods.rome.config import ROMEConfig
from editpack.model.arch import spec_for
from editpack.model.generation import padding_side
from editpack.model.nethook import Trace
from tiny import FACT, TINY, tiny_model, tiny_tokenizer

RECORDS = "counterfact:tests/data/counterfact-edit-25.json"


def test_retention_prompts_are_never_the_measured_ones():
    for fact in editpack.load_facts(RECORDS, skip_invalid=True):
        measured = {p.casefold() for p in relations.same_subject_prompts(fact, 40)}
        kept = [t.replace("{}", fact.subject) for t in relations.retention_prompts(fact, 12)]
        assert 0 < len(kept) <= 12 and len({k.casefold() for k in kept}) == len(kept)
        assert not measured & {k.casefold() for k in kept}
        own = relations.relation_of(fact)
        phrasings = suites_items()[own] if own else []
        assert not set(relations.retention_prompts(fact, 100)) & set(phrasings)  # never the edited relation
        assert len(relations.same_subject_prompts(fact, SAME_SUBJECT)) == SAME_SUBJECT


def suites_items():
    from editpack import suites

    return suites.load("relation_templates").items


def test_measure_asks_the_subjects_other_relations_under_generate_match_only():
    model, tok = tiny_model(), tiny_tokenizer()
    facts = [FACT, editpack.make_fact("the old {}", "london bridge", "tokyo", "london")]
    probes = measure(model, tok, facts, fluency_tokens=0, same_subject=3)
    assert [len(row) for row in probes.gen_same] == [3, 3]
    scores = protocol_scores("generate_match", facts, probes, probes)
    assert scores["relation_specificity"] == {"mean": 1.0, "n": 6}
    assert "relation_specificity" not in protocol_scores("prob_compare", facts, probes, probes)
    assert not measure(model, tok, facts, fluency_tokens=0, same_subject=0).gen_same[0]


def _with_delta(model, tok, module, texts, idxs, delta):
    """Next-token log-probabilities after ``texts`` with ``delta`` added to ``module``'s output at ``idxs``."""
    def add(output, _layer):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[torch.arange(len(texts)), torch.tensor(idxs)] += delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad(), padding_side(tok, "right"), Trace(model, module, retain_output=False, edit_output=add):
        batch = tok(texts, return_tensors="pt", padding=True)
        logits = model(**batch).logits
    last = batch["attention_mask"].sum(1) - 1
    return torch.log_softmax(logits[torch.arange(len(texts)), last], -1)


def test_the_retention_term_keeps_the_subjects_other_relations_where_the_value_is_written():
    """What the term controls: the model with δ written at the subject's last token, after the retained prompts.
    (A ROME pack writes δ through a rank-one update, which on a tiny model without key statistics reaches every
    token; on real models the statistics confine it.)"""
    model, tok = tiny_model(), tiny_tokenizer()
    spec = spec_for(model)
    module = spec.mlp_out_name(0)  # the first layer: every later one carries δ to the prompts' last tokens
    cfg = REGISTRY["rome"](ROMEConfig(**dict(TINY, layers=[0], v_num_grad_steps=15, retain_prompts=6))).resolve(
        model, tok, spec)
    texts, idxs, _ = values.retention_lookups(model, tok, [FACT], 6, 1)
    base = _with_delta(model, tok, module, texts, idxs, 0.0)
    kl, deltas = {}, {}
    for factor in (0.0, 20.0):
        cfg.retain_factor = factor
        with frozen(model), torch.enable_grad():
            deltas[factor] = values.optimize_deltas(model, tok, spec, module, [FACT], cfg)[0].delta
        after = _with_delta(model, tok, module, texts, idxs, deltas[factor])
        kl[factor] = float((base.exp() * (base - after)).sum(-1).mean())
    # A tiny random model barely carries δ to the prompts' ends; SmolLM2's test shows the size of the effect.
    assert (deltas[20.0] - deltas[0.0]).norm() > 1e-3 * deltas[0.0].norm() and 0 < kl[20.0] < kl[0.0], kl
    pack = editpack.edit(model, FACT, "rome", tokenizer=tok, retain_factor=2.0, **dict(TINY, layers=[1]))
    assert pack.hyperparameters["retain_factor"] == 2.0 and pack.hyperparameters["retain_prompts"] == 12


def test_a_prompt_answered_with_the_old_answer_is_not_retained(monkeypatch):
    model, tok = tiny_model(), tiny_tokenizer()
    asked = []

    def answers(_model, _tok, prompts, **_kw):
        asked.extend(prompts)
        return [" paris is big" if i == 0 else " the old" for i in range(len(prompts))]

    monkeypatch.setattr(values, "generate", answers)
    texts, idxs, owners = values.retention_lookups(model, tok, [FACT], 4, 2)
    assert len(asked) == 4 and len(texts) == 3 and owners == [0, 0, 0]
    assert asked[0] not in texts and all(t.endswith(" the") for t in texts)  # each with its answer's first token
    for text, index in zip(texts, idxs):  # the subject's last token ("tower," is one unknown word to this tokenizer)
        assert tok(text)["input_ids"][index] == tok.convert_tokens_to_ids("tower" if "tower " in text else "<unk>")


def test_the_edited_relations_phrasings_split_between_measuring_and_training():
    """template_paraphrases measure generalization where a fact gives none; training_paraphrases are the rest
    (with paraphrases given: every phrasing but those), so an edit is never optimised on what measures it."""
    bare = editpack.make_fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French")
    own = [p.replace("{}", bare.subject) for p in suites_items()["P103"][1:]]
    measured = relations.template_paraphrases(bare)
    trained = [t.replace("{}", bare.subject) for t in relations.training_paraphrases(bare, 10)]
    assert measured and trained and not set(measured) & set(trained) and sorted(measured + trained) == sorted(own)
    assert len(relations.training_paraphrases(bare, 1)) == 1
    given = editpack.make_fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French",
                               paraphrases=[own[0], "Where Danielle Darrieux is from, people speak"])
    trained = [t.replace("{}", given.subject) for t in relations.training_paraphrases(given, 10)]
    assert trained == own[1:]
    unknown = editpack.make_fact("the old {}", "london bridge", "tokyo", "london")
    assert relations.training_paraphrases(unknown, 5) == [] == relations.template_paraphrases(unknown)


def test_paraphrase_prompts_add_the_training_phrasings_as_rewrite_rows(monkeypatch):
    model, tok = tiny_model(), tiny_tokenizer()
    spec = spec_for(model)
    fact = editpack.make_fact("The mother tongue of {} is", "london bridge", "tokyo", "london")
    asked = []
    real = values.split_batch

    def spy(tokenizer, texts, idxs, device):
        asked.append(list(texts))
        return real(tokenizer, texts, idxs, device)

    monkeypatch.setattr(values, "split_batch", spy)
    cfg = REGISTRY["rome"](ROMEConfig(**dict(TINY, layers=[0], v_num_grad_steps=2, paraphrase_prompts=2))).resolve(
        model, tok, spec)
    with frozen(model), torch.enable_grad():
        values.optimize_deltas(model, tok, spec, spec.mlp_out_name(0), [fact], cfg)
        cfg.paraphrase_prompts = 0
        values.optimize_deltas(model, tok, spec, spec.mlp_out_name(0), [fact], cfg)
    with_rows, without = asked
    trained = [t.replace("{}", fact.subject) for t in relations.training_paraphrases(fact, 2)]
    assert len(with_rows) == len(without) + 2 and len(trained) == 2
    assert all(any(row.startswith(t) for row in with_rows) for t in trained)
    assert not any(row.startswith(m) for m in relations.template_paraphrases(fact) for row in with_rows)
    pack = editpack.edit(model, fact, "rome", tokenizer=tok, paraphrase_prompts=3, **dict(TINY, layers=[1]))
    assert pack.hyperparameters["paraphrase_prompts"] == 3
