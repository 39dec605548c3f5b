"""Key statistics as artifacts (issue #42): computed, saved, pushed and pulled like packs, found by later edits in
the local cache, refused for other weights; a stopping rule for how many tokens are enough."""

import json

import pytest
import torch
from click.testing import CliRunner

import editpack
from editpack.model.stats import AUTO_TOLERANCE
import editpack.packs.statistics as store
from editpack.api import compute_stats
from editpack.cli.main import main
from editpack.errors import EditpackError, FingerprintMismatchError
from editpack.model.arch import spec_for
from editpack.model.stats import StatsConfig, compute_second_moments
from editpack.packs.statistics import StatsPack

from tiny import FACT, TINY, WORDS, tiny_model, tiny_tokenizer

SETTINGS = dict(TINY, mom2_adjustment=True, stats_tokens=300, layers=[1])


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(WORDS[i:] + WORDS[:i])}) for i in range(40)) + "\n")
    return path


@pytest.fixture
def model():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.editpack_tokenizer = tok
    return model


def never_computed(monkeypatch):
    monkeypatch.setattr(store, "compute_second_moments",
                        lambda *a, **k: pytest.fail("the statistics were computed instead of found"))


def test_a_statistics_artifact_is_saved_verified_and_described(model, corpus, tmp_path, isolated_home):
    pack = compute_stats(model, "rome", layers=[1], corpus=corpus, tokens=300)
    assert isinstance(pack, StatsPack) and list(pack.entries) == ["model.layers.1.mlp.down_proj"]
    assert pack.provenance["corpus"] == "corpus.jsonl" and pack.provenance["tokens"] >= 300
    path = pack.save(tmp_path / "stats")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "editpack.json", "statistics.safetensors"]
    manifest = (path / "editpack.json").read_text()
    assert str(tmp_path) not in manifest and json.loads(manifest)["kind"] == "statistics"
    loaded = editpack.load_pack(path)
    assert loaded.content_id == pack.content_id
    torch.testing.assert_close(loaded.moments["model.layers.1.mlp.down_proj"],
                               pack.moments["model.layers.1.mlp.down_proj"], rtol=0, atol=0)
    assert "statistics artifact" in (path / "README.md").read_text()
    assert store.listing() and store.listing()[0]["modules"] == ["model.layers.1.mlp.down_proj"]  # the cache too


def test_an_edit_finds_computed_statistics_in_the_cache_and_gets_the_same_delta(model, corpus, isolated_home,
                                                                                  monkeypatch):
    local = editpack.edit(model, FACT, stats_corpus=str(corpus), **SETTINGS)  # computed on the way, cached
    never_computed(monkeypatch)
    again = editpack.edit(model, FACT, stats_corpus=str(corpus), **SETTINGS)
    for module, delta in local.delta.modules.items():
        torch.testing.assert_close(again.delta.modules[module].dense(), delta.dense(), rtol=0, atol=1e-6)


def test_pushed_statistics_pulled_into_an_empty_cache_edit_as_computed_ones(model, corpus, tmp_path, monkeypatch,
                                                                             hub, isolated_home):
    local = editpack.edit(model, FACT, stats_corpus=str(corpus), **SETTINGS)
    stats = compute_stats(model, "rome", layers=[1], corpus=corpus, tokens=300)
    editpack.push(stats.save(tmp_path / "stats"), "user/tiny-stats")
    monkeypatch.setenv("EDITPACK_HOME", str(tmp_path / "empty-home"))  # a fresh machine: nothing cached
    never_computed(monkeypatch)
    pulled = editpack.pull("user/tiny-stats@1.0.0")
    assert pulled.kind == "statistics" and store.listing()  # kept in the local cache
    found = editpack.edit(model, FACT, stats_corpus=str(corpus), **SETTINGS)
    named = editpack.edit(model, FACT, stats="user/tiny-stats@1.0.0", **SETTINGS)
    for edit in (found, named):
        for module, delta in local.delta.modules.items():
            torch.testing.assert_close(edit.delta.modules[module].dense(), delta.dense(), rtol=0, atol=1e-6)
    assert named.hyperparameters["stats"] == "user/tiny-stats@1.0.0"
    assert named.hyperparameters["stats_content"] == stats.content_id
    assert str(tmp_path) not in json.dumps(named.manifest())


def test_statistics_made_for_other_weights_are_refused(model, corpus, tmp_path, isolated_home):
    stats = compute_stats(model, "rome", layers=[1], corpus=corpus, tokens=300).save(tmp_path / "stats")
    other = tiny_model("llama", seed=1)
    other.editpack_tokenizer = tiny_tokenizer()
    with pytest.raises(FingerprintMismatchError, match="another model's statistics"):
        editpack.edit(other, FACT, stats=str(stats), **SETTINGS)
    with torch.no_grad():  # a later block's weights do not shape layer 1's keys; an earlier block's do
        model.get_submodule("model.layers.3.mlp.down_proj").weight.add_(1.0)
    editpack.edit(model, FACT, stats=str(stats), **SETTINGS)
    with torch.no_grad():
        model.get_submodule("model.layers.0.mlp.down_proj").weight.add_(1.0)
    with pytest.raises(FingerprintMismatchError, match="model.layers.1.mlp.down_proj"):
        editpack.edit(model, FACT, stats=str(stats), **SETTINGS)
    with pytest.raises(EditpackError, match="not model.layers.2.mlp.down_proj"):
        editpack.edit(tiny_model("llama"), FACT, tokenizer=tiny_tokenizer(), stats=str(stats),
                      **{**SETTINGS, "layers": [2]})


def test_the_stopping_rule_reads_until_the_solved_update_settles(model, corpus, isolated_home):
    tok, spec = tiny_tokenizer(), spec_for(model)
    settled = StatsConfig(corpus=str(corpus), n_tokens=100_000, batch_size=2, tolerance=0.5, check_every=100)
    moments, count, how = compute_second_moments(model, tok, spec, [1], settled)
    assert "moved less than 0.5" in how["stopped"] and count < 100_000
    changes = [change for _, change in how["checkpoints"]]
    assert changes[0] is None and changes[-1] < 0.5 and all(c >= 0.5 for c in changes[1:-1])
    strict = StatsConfig(corpus=str(corpus), n_tokens=100_000, batch_size=2, tolerance=1e-12, check_every=100)
    _, everything, read = compute_second_moments(model, tok, spec, [1], strict)
    assert "the corpus ended" in read["stopped"] and everything > count
    pack = compute_stats(model, "rome", layers=[1], corpus=corpus, tokens="auto")
    assert pack.provenance["rule"]["tolerance"] == AUTO_TOLERANCE  # the small corpus ends before the first checkpoint
    assert pack.provenance["stopped"].startswith("the corpus ended")


def test_the_stats_commands(tmp_path, corpus, tiny_dir, isolated_home):
    run = lambda *args: CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)  # noqa: E731
    made = run("stats", "compute", "--model", tiny_dir, "--layers", "1", "--corpus", corpus, "--tokens", "300",
               "-o", tmp_path / "s")
    assert made.exit_code == 0 and "key statistics (second moments) of 1 module(s)" in made.output, made.output
    listed = run("stats", "list")
    assert "model.layers.1.mlp.down_proj" in listed.output
    shown = run("show", tmp_path / "s")
    assert shown.exit_code == 0 and "verified: yes" in shown.output, shown.output
    edited = run("edit", "--model", tiny_dir, "--prompt", "the famous eiffel tower", "--subject", "eiffel tower",
                 "--target", "rome", "--layers", "1", "--stats", tmp_path / "s", "--set", "clamp_norm_factor=10000",
                 "--set", "context_template_lengths=[[3,2]]", "--set", "v_weight_decay=0", "--no-eval",
                 "-o", tmp_path / "p")
    assert edited.exit_code == 0, edited.output
    assert editpack.load_pack(tmp_path / "p").hyperparameters["stats"].startswith("stats-")
    bad = run("stats", "compute", "--model", tiny_dir, "--tokens", "many", "-o", tmp_path / "t")
    assert bad.exit_code == 2 and "neither a positive number of tokens nor auto" in bad.output
    wrong = run("stats", "compute", "--model", tiny_dir, "--method", "ft", "-o", tmp_path / "t")
    assert wrong.exit_code == 2 and "'ft' is not one of" in wrong.output
