"""The evaluation engine and the evaluation card, on tiny models."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

import editpack
from editpack.packs.card import render_card
from editpack.cli.main import main
from editpack.evaluation.protocols import PROTOCOLS, ngram_entropy, normalise, starts_with
from editpack.model.scoring import score
from editpack.evaluation.report import evaluate_pack

from tiny import TINY, tiny_model, tiny_tokenizer

FACT = editpack.make_fact("the famous {}", "eiffel tower", "rome", "paris", paraphrases=["the big eiffel tower"],
                          neighborhood=[("the famous louvre", "paris"), ("the capital of germany is", "berlin")],
                          portability=[("the eiffel tower is in the country", "italy")])


def test_ngram_entropy_matches_hand_computation():
    assert ngram_entropy("a a a a") == 0.0  # one bigram, one trigram
    # "a b c d": 3 distinct bigrams (log2 3) and 2 trigrams (1 bit); weights 2/3 and 4/3, arithmetic mean
    expected = ((2 / 3) * torch.log2(torch.tensor(3.0)).item() + (4 / 3) * 1.0) / 2
    assert ngram_entropy("a b c d") == pytest.approx(expected)


def test_generate_match_normalisation():
    assert starts_with("  Rome, Italy.", "rome") and starts_with('"Paris" is', "Paris")
    assert not starts_with("Romania", "Rome") and not starts_with("Romeo", "rome")  # whole words only
    assert not starts_with("The city", "Rome") and normalise("  A  b ") == "a b"


def test_batched_scores_equal_single_scores():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    pairs = [("the famous eiffel tower", "rome"), ("the capital of germany is", "berlin paris"), ("a", "red")]
    batched = score(model, tok, pairs)
    for pair, b in zip(pairs, batched):
        (single,) = score(model, tok, [pair])
        assert single.predictions == b.predictions
        assert single.nll == pytest.approx(b.nll, rel=1e-4, abs=1e-5)


@pytest.fixture(params=["llama", "gpt2"])
def evaluated(request):
    model, tok = tiny_model(request.param), tiny_tokenizer()
    pack = editpack.edit(model, FACT, tokenizer=tok, layers=[1], **TINY)
    result = evaluate_pack(model, tok, pack, fluency_tokens=12)
    return model, tok, pack, result


def test_evaluation_result_shape_and_sanity(evaluated):
    model, _, _, result = evaluated
    assert not isinstance(model, type(None)) and not editpack.applied(model)  # model restored
    assert set(result["protocols"]) == set(PROTOCOLS) and result["n_facts"] == 1
    tf, pc, gm = (result["protocols"][p] for p in PROTOCOLS)
    assert tf["reliability"]["after"] == 1.0 and tf["reliability"]["before"] < 1.0
    assert tf["locality"]["before"] == 1.0 and gm["locality"]["before"] == 1.0  # base vs itself
    assert pc["reliability"] == {"before": 0.0, "after": 1.0, "n": 1} or pc["reliability"]["after"] == 1.0
    assert pc["locality"]["n"] == 2 and pc["portability"]["n"] == 1 and tf["generalization"]["n"] == 1
    assert "efficacy_magnitude" in pc and result["fluency"]["n"] == 1


def test_card_shows_the_numbers_and_its_yaml_parses(evaluated, tmp_path):
    _, _, pack, result = evaluated
    pack.evaluation = result
    pack.save(tmp_path / "p")
    card = (tmp_path / "p" / "README.md").read_text()
    assert card == render_card(editpack.EditPack.load(tmp_path / "p"))  # deterministic
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "peft" and "knowledge-editing" in header["tags"]
    entries = header["model-index"][0]["results"]
    reliability = [e for e in entries if e["metrics"][0]["type"] == "teacher_forced_token_acc/reliability"]
    assert reliability[0]["metrics"][0]["value"] == pytest.approx(1.0)
    assert "### `generate_match`" in card and "| reliability |" in card
    manifest = json.loads((tmp_path / "p" / "editpack.json").read_text())
    assert manifest["evaluation"]["protocols"] == result["protocols"]


def test_unknown_protocol_is_rejected(evaluated):
    model, tok, pack, _ = evaluated
    with pytest.raises(ValueError, match="unknown protocol 'exact'"):
        evaluate_pack(model, tok, pack, protocols=["exact"])


def test_eval_command_writes_manifest_and_card(tmp_path):
    folder = tmp_path / "m"
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    model, tok = editpack.load_model(str(folder))
    pack = editpack.edit(model, FACT, layers=[1], **TINY)
    pack.save(tmp_path / "p")
    unresolved = CliRunner().invoke(main, ["eval", str(tmp_path / "p")], catch_exceptions=False)
    assert unresolved.exit_code != 0 and "pass --model" in unresolved.output  # the pack records no local path
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "p"), "--model", str(folder), "--protocol",
                                       "prob_compare"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "prob_compare" in result.stdout and "reliability" in result.stdout
    loaded = editpack.EditPack.load(tmp_path / "p")  # hashes still verify after the rewrite
    assert list(loaded.evaluation["protocols"]) == ["prob_compare"]
    assert "### `prob_compare`" in (tmp_path / "p" / "README.md").read_text()


def test_rows_are_grouped_by_the_context_they_share_and_each_keeps_its_own_tail():
    from editpack.model.generation import shared_prefix_groups

    a, b = list(range(100, 140)), list(range(100, 120)) + list(range(300, 320))  # b shares a's first 20 tokens
    rows = [a + [1, 2], b + [3], a + [4, 5, 6], [7, 8, 9], b + [1], a]
    groups = shared_prefix_groups(rows, own=[2, 1, 3, 1, 1, 2], min_shared=8)
    assert sorted(map(sorted, (m for _, m in groups))) == [[0, 2, 5], [1, 4], [3]]
    lengths = {tuple(sorted(m)): n for n, m in groups}
    assert lengths[(0, 2, 5)] == 38  # row 5 keeps its last two tokens: the group shares a's first 38
    assert lengths[(1, 4)] == 40 and lengths[(3,)] == 0
    # Two rows whose shared start is shorter than ``min_shared`` are computed whole.
    assert [n for n, _ in shared_prefix_groups([a[:6] + [1], a[:6] + [2]], own=[1, 1], min_shared=8)] == [0, 0]
