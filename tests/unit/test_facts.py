import json

import pytest

from editpack.errors import InvalidFactError
from editpack.facts import Fact, Probe, facts_from_records, load_facts, make_fact


def test_subject_in_prompt_becomes_a_template():
    fact = make_fact("The Eiffel Tower is in", "Eiffel Tower", " Rome ", "Paris")
    assert fact.prompt == "The {} is in" and fact.target_new == "Rome" and fact.text == "The Eiffel Tower is in"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="The tower is in", subject="Eiffel Tower", target_new="Rome"), "does not occur in prompt"),
        (dict(prompt="{} is in", subject="Eiffel Tower", target_new="  "), "target_new is missing or empty"),
        (dict(prompt="{} is in", subject="", target_new="Rome"), "subject is missing or empty"),
        (dict(prompt="{} is in", subject="X", target_new="Paris", target_true="paris"), "equals the true answer"),
        (dict(prompt="{} and {} are", subject="X", target_new="Y"), "more than one"),
    ],
)
def test_invalid_facts_are_rejected_with_the_problem(kwargs, message):
    with pytest.raises(InvalidFactError, match=message):
        make_fact(**kwargs, where="record 7")


def test_unknown_fields_are_rejected_naming_the_record():
    with pytest.raises(InvalidFactError, match=r"facts record 1: unknown field\(s\) colour"):
        facts_from_records([{"prompt": "{} is", "subject": "a", "target_new": "b"},
                            {"prompt": "{} is", "subject": "a", "target_new": "b", "colour": "red"}])


def test_round_trip_through_dict():
    fact = make_fact("{} is in", "Tower", "Rome", "Paris", paraphrases=["Where is Tower?"],
                     neighborhood=[("Louvre is in", "Paris")], portability=[{"prompt": "Tower's country", "answer": "Italy"}])
    again = Fact.from_dict(json.loads(json.dumps(fact.to_dict())))
    assert again == fact and again.neighborhood == (Probe("Louvre is in", "Paris"),)


def test_jsonl_yaml_and_json_files(tmp_path):
    record = {"prompt": "{} is in", "subject": "Tower", "target_new": "Rome"}
    (tmp_path / "f.jsonl").write_text(json.dumps(record) + "\n\n" + json.dumps(record) + "\n")
    (tmp_path / "f.yaml").write_text("- prompt: '{} is in'\n  subject: Tower\n  target_new: Rome\n")
    (tmp_path / "f.json").write_text(json.dumps(record))
    assert len(load_facts(tmp_path / "f.jsonl")) == 2
    assert load_facts(tmp_path / "f.yaml")[0].target_new == "Rome"
    assert load_facts(tmp_path / "f.json")[0].subject == "Tower"


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(InvalidFactError, match="does not exist"):
        load_facts(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidFactError, match="bad.json: not valid JSON"):
        load_facts(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(InvalidFactError, match="no facts found"):
        load_facts(tmp_path / "empty.json")


def test_counterfact_flat(test_data):
    facts = load_facts(test_data / "counterfact-edit-25.json", limit=3)
    first = facts[0]
    assert first.prompt == "The mother tongue of {} is" and first.subject == "Danielle Darrieux"
    assert (first.target_new, first.target_true) == ("English", "French")
    assert first.paraphrases and first.neighborhood[0].answer == "French" and first.id == "0"


def test_counterfact_rome_schema(test_data):
    facts = load_facts("counterfact:" + str(test_data / "counterfact-rome-3.json"), limit=2)
    assert facts[0].relation == "P103" and len(facts[0].paraphrases) == 2 and len(facts[0].neighborhood) == 10


def test_zsre_skips_unusable_records_only_when_asked(test_data):
    path = test_data / "zsre-mend-train-11.json"
    with pytest.raises(InvalidFactError, match="record 10"):
        load_facts(path)
    facts = load_facts(path, skip_invalid=True)
    assert len(facts) + len(facts.skipped) == 11 and facts.skipped
    assert facts[0].neighborhood[0].prompt.startswith("john goodman")  # "nq question: " prefix removed


def test_mquake_gives_portability_questions(test_data):
    facts = load_facts(test_data / "mquake-hard-2.json", limit=1)
    assert len(facts) >= 2 and facts[-1].portability and not facts[0].portability
