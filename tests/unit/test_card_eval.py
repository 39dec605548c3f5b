"""Evaluation at creation, default probes, the card's side-effect section and chart, and `editpack verify`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import editpack
from editpack.evaluation import side_effects
from editpack.evaluation.protocols import SAME_SUBJECT
from editpack import relations, suites
from editpack.packs.card import render_card
from editpack.cli.main import main

from traces import assert_no_local_traces

SETTINGS = ["--set", "mom2_adjustment=false", "--set", "context_template_lengths=[[3,2]]",
            "--set", "clamp_norm_factor=10000", "--set", "v_weight_decay=0", "--layers", "1"]
ONE = ["--prompt", "the famous eiffel tower", "--subject", "eiffel tower", "--target", "rome", "--target-true", "paris"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def evaluated(tiny_dir, tmp_path):
    result = run("edit", "--model", tiny_dir, *ONE, *SETTINGS, "-o", tmp_path / "p")
    assert result.exit_code == 0, result.output
    return tmp_path / "p", result.output


def rehash(pack: Path) -> None:
    manifest = json.loads((pack / "editpack.json").read_text())
    manifest["files"] = {n: hashlib.sha256((pack / n).read_bytes()).hexdigest() for n in manifest["files"]}
    (pack / "editpack.json").write_text(json.dumps(manifest, indent=2))


def test_edit_evaluates_and_the_card_shows_side_effects_and_a_chart(evaluated):
    pack_dir, output = evaluated
    assert "evaluated in " in output and "unrelated answers changed" in output
    pack = editpack.load_pack(pack_dir)
    side = pack.evaluation["side_effects"]
    assert set(side["claims"]) == {"locality_unchanged", "locality_kl", "same_subject_unchanged", "perplexity",
                                   "fluency"}
    for claim in side["claims"].values():  # machine-readable: protocol, suite and its hash, n, before, after
        assert set(claim) == {"protocol", "suite", "suite_sha256", "n", "before", "after"}
        assert claim["suite_sha256"] == suites.load(claim["suite"]).sha256 and claim["n"] > 0
    assert side["claims"]["locality_unchanged"]["n"] == 60 and side["claims"]["same_subject_unchanged"]["n"] == SAME_SUBJECT
    assert side["claims"]["locality_kl"]["after"] >= 0 and side["claims"]["perplexity"]["before"] > 1
    card = (pack_dir / "README.md").read_text()
    assert "### Side effects" in card and side["verdict"] in card and "![before and after](evaluation.png)" in card
    assert "evaluation.png" in pack.files and (pack_dir / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Measured in {pack.evaluation['seconds']:.1f} s" in card
    assert "Generalization: 1 fact not measured (no paraphrases, relation unknown)" in card  # no relation named
    metadata = card.split("---")[1]
    assert "model-index" in metadata
    assert_no_local_traces(pack_dir, str(pack_dir.parent))  # the base was a local folder: named, not located


def test_no_eval_says_so_and_has_no_chart(tiny_dir, tmp_path):
    result = run("edit", "--model", tiny_dir, *ONE, *SETTINGS, "--no-eval", "-o", tmp_path / "p")
    assert result.exit_code == 0 and "evaluated in" not in result.output
    card = (tmp_path / "p" / "README.md").read_text()
    assert "Not evaluated: the pack was made with `--no-eval`" in card
    assert not (tmp_path / "p" / "evaluation.png").exists()


def test_generalization_comes_from_relation_templates_when_a_fact_has_no_paraphrases():
    known = editpack.make_fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French")
    by_id = editpack.make_fact("{} speaks", "Danielle Darrieux", "English", relation="P1412")
    unknown = editpack.make_fact("the famous {}", "eiffel tower", "rome")
    given = editpack.make_fact("the famous {}", "eiffel tower", "rome", paraphrases=["the big eiffel tower"])
    facts, origin = side_effects.with_default_paraphrases([known, by_id, unknown, given])
    assert origin == {"paraphrases": 1, "relation_templates": 2, "not_measured": 1}
    assert relations.relation_of(known) == "P103"  # its prompt is one of CounterFact's phrasings of P103
    assert facts[0].paraphrases and all("Danielle Darrieux" in p for p in facts[0].paraphrases)
    assert "The mother tongue of Danielle Darrieux is" not in facts[0].paraphrases  # not the edit prompt itself
    assert not facts[2].paraphrases and facts[3].paraphrases == ("the big eiffel tower",)
    same = relations.same_subject_prompts(known, 5)
    assert len(same) == 5 and all("Danielle Darrieux" in p for p in same)
    assert not any("mother tongue" in p.lower() or "native language" in p.lower() for p in same)


def test_same_subject_prompts_leave_out_the_edited_relations_wording():
    fact = editpack.make_fact("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")
    prompts = relations.same_subject_prompts(fact, 5)
    assert len(prompts) == 5 and not any("located in" in p for p in prompts)


def test_verify_checks_files_card_and_with_rerun_every_claim(evaluated, tiny_dir):
    pack_dir, _ = evaluated
    plain = run("verify", pack_dir)
    assert plain.exit_code == 0 and "the card is the manifest's" in plain.output, plain.output
    again = run("verify", pack_dir, "--rerun", "--model", tiny_dir)
    assert again.exit_code == 0, again.output
    assert "base fingerprint matches" in again.output
    reproduced = [line for line in again.output.splitlines() if "claims reproduced" in line][0]
    count = int(reproduced.split(" of ")[1].split()[0])
    assert count >= 30 and reproduced.split(": ")[1].startswith(f"{count} of {count}")


def test_verify_rerun_catches_altered_numbers_and_plain_verify_an_altered_card(evaluated, tiny_dir):
    pack_dir, _ = evaluated
    pack = editpack.load_pack(pack_dir)
    claim = pack.evaluation["side_effects"]["claims"]["locality_unchanged"]
    claim["after"] = 1.0 if claim["after"] < 1.0 else 0.5  # a nicer-looking (or simply wrong) claim
    pack.save(pack_dir, overwrite=True)  # manifest, card and chart consistent with the altered number
    assert run("verify", pack_dir).exit_code == 0  # the files alone cannot tell
    caught = run("verify", pack_dir, "--rerun", "--model", tiny_dir)
    assert caught.exit_code == 1 and "side_effects/locality_unchanged/after: the card says" in caught.output
    card = pack_dir / "README.md"
    card.write_text(card.read_text().replace("unrelated answers changed", "unrelated answers kept"))
    rehash(pack_dir)
    tampered = run("verify", pack_dir)
    assert tampered.exit_code == 1 and "README.md is not the card of this manifest" in tampered.output


def test_stack_evaluates_the_stacked_pack(tiny_dir, tmp_path):
    second = ["--prompt", "the old london bridge", "--subject", "london bridge", "--target", "tokyo"]
    assert run("edit", "--model", tiny_dir, *ONE, *SETTINGS, "--no-eval", "-o", tmp_path / "a").exit_code == 0
    assert run("edit", "--model", tiny_dir, *second, *SETTINGS, "--no-eval", "-o", tmp_path / "b").exit_code == 0
    stacked = run("stack", tmp_path / "a", tmp_path / "b", "--model", tiny_dir, "-o", tmp_path / "s")
    assert stacked.exit_code == 0 and "evaluated in" in stacked.output, stacked.output
    pack = editpack.load_pack(tmp_path / "s")
    assert pack.evaluation["n_facts"] == 2 and pack.evaluation["side_effects"]["claims"]["same_subject_unchanged"]["n"] == 2 * SAME_SUBJECT
    assert render_card(pack) == (tmp_path / "s" / "README.md").read_text()


def test_verify_takes_hub_references(evaluated, tiny_dir, hub):
    pack_dir, _ = evaluated
    editpack.push(pack_dir, "user/eiffel")
    shown = run("verify", "user/eiffel@1.0.0", "--rerun", "--model", tiny_dir)
    assert shown.exit_code == 0 and "the card is the manifest's" in shown.output, shown.output
    assert "claims reproduced" in shown.output


def test_the_unedited_models_suites_are_measured_once_per_model_and_settings(tiny_dir, isolated_home, monkeypatch):
    """A second card on the same model reads the base model's facts-independent suites (unrelated prompts,
    perplexity, fluency) from the cache, keyed by its weights, tokenizer, suites and settings, and claims the same
    numbers as measured afresh; a model that carries packs, or other weights, is measured again."""
    model, tok = editpack.load_model(str(tiny_dir))
    first = editpack.edit(model, editpack.make_fact("the famous {}", "eiffel tower", "rome"), layers=[1],
                          mom2_adjustment=False, context_template_lengths=[[3, 2]], clamp_norm_factor=1e4)
    second = editpack.edit(model, editpack.make_fact("the old {}", "london bridge", "tokyo"), layers=[1],
                           mom2_adjustment=False, context_template_lengths=[[3, 2]], clamp_norm_factor=1e4,
                           name="second")
    fresh = editpack.evaluate_pack(model, tok, second)["side_effects"]["claims"]
    calls = []
    real = side_effects.measure_fixed
    monkeypatch.setattr(side_effects, "measure_fixed", lambda *a: calls.append(1) or real(*a))
    editpack.evaluate_pack(model, tok, first)
    assert calls == [1]  # the edited side only: the base was measured by the evaluation before
    assert editpack.evaluate_pack(model, tok, second)["side_effects"]["claims"] == fresh
    calls.clear()
    carrying = editpack.apply(model, first)
    editpack.evaluate_pack(carrying, tok, second)
    assert calls == [1, 1]  # a model with a pack on is not the unedited model the cache holds
    model = editpack.revert(carrying)
    calls.clear()
    with torch.no_grad():
        model.get_submodule("model.layers.3.mlp.down_proj").weight.add_(0.01)
    editpack.evaluate_pack(model, tok, second)
    assert calls == [1, 1]  # other weights: measured again


def test_a_cards_suites_read_the_next_token_distribution_off_the_answers_first_step(tiny_dir):
    from editpack.model.generation import generate, generate_with_first_logits, next_token_logits

    model, tok = editpack.load_model(str(tiny_dir))
    prompts = ["the famous eiffel tower", "a", "the old london bridge is in the city of"]
    texts, first = generate_with_first_logits(model, tok, prompts, max_new_tokens=4, batch_size=2)
    assert texts == generate(model, tok, prompts, max_new_tokens=4, batch_size=2)
    assert torch.allclose(first, next_token_logits(model, tok, prompts), atol=1e-5)


def test_a_card_asks_each_same_subject_prompt_once_per_model(tiny_dir, monkeypatch):
    """The probes of a pack's facts and the card's same-subject suite ask the same prompts: each model (base,
    edited) generates them once, and the claims are those of asking them twice."""
    model, tok = editpack.load_model(str(tiny_dir))
    pack = editpack.edit(model, editpack.make_fact("the famous {}", "eiffel tower", "rome"), layers=[1],
                         mom2_adjustment=False, context_template_lengths=[[3, 2]], clamp_norm_factor=1e4)
    asked = []
    real = side_effects.generate
    monkeypatch.setattr(side_effects, "generate", lambda m, t, prompts, **kw: asked.extend(prompts) or real(
        m, t, prompts, **kw))
    claims = editpack.evaluate_pack(model, tok, pack)["side_effects"]["claims"]
    same = relations.same_subject_prompts(pack.facts[0], SAME_SUBJECT)
    assert same and not set(same) & set(asked)  # the suites took the probes' answers
    monkeypatch.setattr(side_effects, "_answers", lambda m, t, prompts, s, answered, guessed: real(
        m, t, prompts, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size))
    assert editpack.evaluate_pack(model, tok, pack)["side_effects"]["claims"] == claims


def test_the_edited_side_checks_the_unedited_answers_and_claims_the_same(tiny_dir, isolated_home, monkeypatch):
    """The edited model's answers are checked against the unedited model's (one teacher-forced forward each
    batch) and decoded only where they depart; the card claims what decoding every answer claims."""
    from editpack.evaluation.report import claims_of
    from editpack.model import generation

    model, tok = editpack.load_model(str(tiny_dir))
    pack = editpack.edit(model, editpack.make_fact("the famous {}", "eiffel tower", "rome"), layers=[1],
                         mom2_adjustment=False, context_template_lengths=[[3, 2]], clamp_norm_factor=1e4)
    checked = []
    real = generation.check
    monkeypatch.setattr(generation, "check", lambda *a: checked.append(len(a[1])) or real(*a))
    drafted = claims_of(editpack.evaluate_pack(model, tok, pack))
    assert sum(checked) >= 60 + 8  # at least the unrelated prompts and the fluency suite
    monkeypatch.setattr(generation, "verifiable", lambda m: False)
    decoded = claims_of(editpack.evaluate_pack(model, tok, pack))
    assert drafted.keys() == decoded.keys()
    for name, (value, _, n) in decoded.items():
        assert drafted[name][2] == n
        assert (value is None) == (drafted[name][0] is None)
        if value is not None:
            assert drafted[name][0] == pytest.approx(value, abs=1e-4), name


def test_generate_cuts_each_continuation_to_its_own_length(tiny_dir):
    from editpack.model.generation import generate

    model, tok = editpack.load_model(str(tiny_dir))
    prompts = ["the famous eiffel tower", "a", "the old london bridge is in the city of"]
    mixed = generate(model, tok, prompts, max_new_tokens=[2, 6, 4], batch_size=3)
    assert mixed == [generate(model, tok, [p], max_new_tokens=n)[0] for p, n in zip(prompts, [2, 6, 4])]


def test_a_cards_free_generations_of_its_facts_share_the_fluency_suites_batches(tiny_dir, monkeypatch):
    """The edit prompts' 60-token continuations (the probes' fluency) are generated in the same call as the
    fluency suite, with the same numbers as generated alone."""
    model, tok = editpack.load_model(str(tiny_dir))
    pack = editpack.edit(model, editpack.make_fact("the famous {}", "eiffel tower", "rome"), layers=[1],
                         mom2_adjustment=False, context_template_lengths=[[3, 2]], clamp_norm_factor=1e4)
    alone = editpack.evaluate_pack(model, tok, pack, default_probes=False)["fluency"]
    calls = []
    real = side_effects.generate
    monkeypatch.setattr(side_effects, "generate", lambda m, t, prompts, **kw: calls.append(
        (list(prompts), kw["max_new_tokens"])) or real(m, t, prompts, **kw))
    shared = editpack.evaluate_pack(model, tok, pack)["fluency"]
    assert shared == alone and shared["n"] == 1
    together = [(prompts, lengths) for prompts, lengths in calls if "the famous eiffel tower" in prompts]
    # the edited side always; the base side too unless its fluency suite came from the cache
    assert any(len(prompts) > 1 and 60 in lengths for prompts, lengths in together), together
