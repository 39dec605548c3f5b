"""Key statistics: the right numbers, computed once, cached by what they depend on."""

import json
import shutil

import pytest
import torch

import editpack.model.stats as stats
import editpack.packs.statistics as store
from editpack.model.arch import spec_for
from editpack.model.nethook import Trace
from editpack.model.stats import StatsConfig, stats_key
from editpack.packs.statistics import cached_moments

from tiny import WORDS, tiny_model, tiny_tokenizer


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"title": str(i), "text": " ".join(WORDS[i : i + 12])}) for i in range(0, 60, 3)]
    path.write_text("\n".join(lines) + "\n")
    return path


def second_moment(model, tokenizer, spec, layer, config):
    """One layer's cached statistics."""
    return cached_moments(model, tokenizer, spec, [layer], config)[layer]


def forget_statistics(home):
    """Empty the local statistics cache (the model's own samples are kept)."""
    for folder in (home / "stats").iterdir():
        if folder.is_dir():
            shutil.rmtree(folder)


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
    real = store.compute_second_moments
    monkeypatch.setattr(store, "compute_second_moments", lambda *a: calls.append(1) or real(*a))
    torch.testing.assert_close(second_moment(model, tok, spec, 1, config), first, rtol=0, atol=0)
    assert not calls, "the cached statistics must be read, not recomputed"
    path = stats_key(model, spec, 1, config)[0]
    with torch.no_grad():  # a later block does not shape layer 1's keys
        model.get_submodule(spec.block_name(3)).mlp.c_fc.weight.add_(1.0)
    assert stats_key(model, spec, 1, config)[0] == path
    with torch.no_grad():  # an earlier one does
        model.get_submodule(spec.block_name(0)).mlp.c_fc.weight.add_(1.0)
    assert stats_key(model, spec, 1, config)[0] != path
    assert not [p for p in (isolated_home / "stats").iterdir() if p.name.startswith(".")]


def test_model_sampled_text_is_reproducible(isolated_home):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    spec = spec_for(model)
    config = StatsConfig(corpus=None, n_tokens=300, batch_size=16, seed=3)
    a, n, _ = stats.compute_second_moments(model, tok, spec, [0], config)
    b, _, _ = stats.compute_second_moments(model, tok, spec, [0], config)
    assert n >= 300 and torch.equal(a[0], b[0])


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
    forget_statistics(isolated_home)  # neither the file nor its statistics: a clear request for the corpus
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
    together = cached_moments(model, tok, spec, [2, 1], config)
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
    forget_statistics(isolated_home)
    again = second_moment(model, tok, spec, 0, config)  # statistics gone, samples kept: the same numbers
    torch.testing.assert_close(again, first, rtol=0, atol=0)
