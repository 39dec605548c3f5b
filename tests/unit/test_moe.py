"""Mixture-of-Experts editing (docs/concepts/moe.md) on tiny Mixtral, Qwen3-MoE and gpt-oss models: an edit
changes only the experts the subject's last token is routed to, each with its own key and statistics; the
router and the other experts stay bit for bit; the pack is a PEFT LoRA on the stacked parameter
(``target_parameters``). The family table (test_families.py) covers loading, reverting and exports."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import editpack
from editpack.api import compute_stats
from editpack.errors import UnknownArchitectureError
from editpack.methods.locate.experts import expert_inputs, experts_module, routes
from editpack.methods.locate.keys import lookups
from editpack.model.arch import infer_spec, spec_for
from editpack.model.nethook import Trace
from editpack.model.stats import per_expert
from editpack.packs.delta import ExpertsDelta, LowRankDelta
from editpack.testing import FACT, TINY_LOCATE, tiny_facts, tiny_model, tiny_tokenizer

from tiny import logits

MOE = ["mixtral", "qwen3_moe", "gpt_oss"]
CORPUS = "tests/data/wikipedia-slice.jsonl"
ROME = dict(TINY_LOCATE, layers=[1], v_num_grad_steps=20)


def model_of(model_type: str):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    model.editpack_tokenizer = tok
    return model, tok


def rank_of(model, tok, fact) -> int:
    """Where the fact's new target ranks in the next-token logits after its prompt (0: the top)."""
    row = logits(model, tok, fact.text)
    return int((row > row[tok.convert_tokens_to_ids(fact.target_new)]).sum())


def subject_route(model, tok, fact, layer: int):
    spec = spec_for(model)
    texts, idxs = lookups(tok, [fact.prompt], fact)
    return routes(model, tok, spec, layer, texts, idxs)[0]


@pytest.mark.parametrize("model_type", MOE)
def test_rome_changes_only_the_experts_the_subject_is_routed_to(model_type, tmp_path):
    model, tok = model_of(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pack = editpack.edit(model, FACT, tokenizer=tok, **ROME)
    name = "model.layers.1.mlp.experts.down_proj"
    delta = pack.delta.modules[name]
    assert list(pack.delta.modules) == [name] and isinstance(delta, ExpertsDelta)
    routed = subject_route(model, tok, FACT, 1).experts
    assert sorted(delta.edited()) == sorted(routed) and len(routed) == model.config.num_experts_per_tok
    merged = editpack.apply(model, pack, merge=True)
    assert rank_of(merged, tok, FACT) == 0
    after = merged.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == [name]  # router, shared weights and other layers untouched
    transposed = getattr(experts_module(merged, spec_for(merged), 1), "is_transposed", False)
    for expert in range(before[name].shape[0]):  # the other experts' slices are bit for bit the same
        same = torch.equal(before[name][expert], after[name][expert])
        assert same == (expert not in routed), (expert, transposed)
    editpack.revert(merged)
    manifest = json.loads((pack.save(tmp_path / "p") / "editpack.json").read_text())
    entry = manifest["delta"]["modules"][name]
    assert entry["experts"] == before[name].shape[0] and sorted(entry["edited_experts"]) == sorted(routed)
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [name] and not config["target_modules"]


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_memit_and_alphaedit_edit_a_batch_through_each_facts_experts(method):
    model, tok = model_of("mixtral")
    facts = tiny_facts(4)
    settings = dict(TINY_LOCATE, layers=[1, 2], v_num_grad_steps=20, mom2_update_weight=0.01)
    settings.update({"l2": 0.01} if method == "alphaedit" else {})
    pack = editpack.edit(model, facts, method, tokenizer=tok, **settings)
    edited = editpack.apply(model, pack, merge=True)
    assert [rank_of(edited, tok, f) for f in facts] == [0, 0, 0, 0]
    # Each layer is solved with the layers below it edited, so its routing is the edited model's.
    for layer in (1, 2):
        routed = {e for f in facts for e in subject_route(edited, tok, f, layer).experts}
        assert set(pack.delta.modules[f"model.layers.{layer}.mlp.experts.down_proj"].edited()) == routed
    model = editpack.revert(edited)
    if method == "alphaedit":  # each expert keeps the keys of its own facts for the next round
        keys = {k: v.shape[0] for k, v in pack.delta.state.items()}
        assert keys and all(".experts.down_proj." in k for k in keys)
        assert sum(n for k, n in keys.items() if "layers.1." in k) == 4 * model.config.num_experts_per_tok
        grown = editpack.extend(model, pack, [editpack.make_fact("the old {}", "red river", "tokyo")],
                                tokenizer=tok, **settings)
        assert sum(v.shape[0] for k, v in grown.delta.state.items() if "layers.1." in k) == 5 * 2


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_statistics_are_per_expert_over_the_tokens_routed_to_it(model_type, isolated_home, tmp_path):
    model, tok = model_of(model_type)
    lines = ["the famous eiffel tower is in the city of paris in france .",
             "the old bridge over the red river is in london , england .",
             "the louvre is a famous museum in paris and the colosseum is in rome .",
             "she speaks french and he plays the piano and the guitar ."] * 6
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(lines))
    stats = compute_stats(model, "rome", corpus=str(corpus), tokens=10_000, tokenizer=tok, layers=[1])
    name = "model.layers.1.mlp.experts.down_proj"
    moments = stats.moments[name]
    spec = spec_for(model)
    experts = experts_module(model, spec, 1)
    # By hand: every text alone (no padding), each token's key at each expert the router sends it to.
    width = moments.shape[-1]
    sums = torch.zeros(moments.shape, dtype=torch.float64)
    counts = torch.zeros(moments.shape[0], dtype=torch.long)
    for text in lines:  # read as the statistics read a corpus: without special tokens
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with Trace(model, spec.experts_name(1), retain_args=True, retain_output=False, stop=True) as trace:
            model(input_ids=ids)
        hidden, index = trace.args[0].reshape(-1, model.config.hidden_size), trace.args[1].reshape(ids.shape[1], -1)
        for token in range(ids.shape[1]):
            for expert in index[token].tolist():
                key = expert_inputs(experts, hidden[token][None], expert)[0].double()
                sums[expert] += torch.outer(key, key)
                counts[expert] += 1
    assert stats.provenance["expert_tokens"][name] == counts.tolist()
    assert sum(counts.tolist()) == stats.provenance["tokens"] * model.config.num_experts_per_tok
    torch.testing.assert_close(moments, per_expert(sums, counts).float(), atol=1e-5, rtol=1e-4)
    assert all(int(n) >= width for n in counts), counts  # each expert's own moment, none a fallback


def test_an_expert_reached_by_too_few_tokens_falls_back_to_the_layers_scale_times_identity():
    totals = torch.zeros(3, 2, 2, dtype=torch.float64)
    totals[0] = torch.tensor([[4.0, 2.0], [2.0, 6.0]])  # 2 tokens: enough for a width of 2
    totals[1] = torch.tensor([[8.0, 0.0], [0.0, 8.0]])  # 1 token: too few
    out = per_expert(totals, torch.tensor([2, 1, 0]))
    torch.testing.assert_close(out[0], totals[0] / 2)
    pooled_scale = float((totals.sum(0) / 3).diagonal().mean())
    for expert in (1, 2):
        torch.testing.assert_close(out[expert], torch.eye(2, dtype=torch.float64) * pooled_scale)


def test_rome_with_per_expert_statistics_edits_and_loads_in_plain_peft(tmp_path, isolated_home):
    model, tok = model_of("qwen3_moe")
    settings = {k: v for k, v in ROME.items() if k != "mom2_adjustment"}
    pack = editpack.edit(model, FACT, tokenizer=tok, stats_corpus=CORPUS, stats_tokens=600, **settings)
    path = pack.save(tmp_path / "p")
    ours = logits(editpack.apply(model, editpack.load_pack(path)), tok, FACT.text)
    theirs = logits(PeftModel.from_pretrained(tiny_model("qwen3_moe"), str(path)).eval(), tok, FACT.text)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert int(ours.argmax()) == tok.convert_tokens_to_ids("rome")


def test_grace_wraps_the_whole_moe_block_and_changes_no_weight():
    model, tok = model_of("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pack = editpack.edit(model, FACT, "grace", tokenizer=tok, layers=[1], context_template_lengths=[[3, 2]],
                         clamp_norm_factor=1e4, v_weight_decay=0.0, v_num_grad_steps=40)
    assert pack.module == "model.layers.1.mlp"
    edited = editpack.apply(model, pack)
    assert rank_of(edited, tok, FACT) == 0
    assert all(torch.equal(v, before[k]) for k, v in edited.state_dict().items() if k in before)
    editpack.revert(edited)


def test_methods_that_do_not_edit_experts_are_refused_by_name():
    model, tok = model_of("mixtral")
    with pytest.raises(UnknownArchitectureError, match="ft does not edit Mixture-of-Experts models.*"
                                                       "alphaedit, grace, memit, rome do"):
        editpack.edit(model, FACT, "ft", tokenizer=tok)


def test_an_unshipped_moe_family_is_edited_through_its_inferred_layout():
    model, tok = model_of("olmoe")
    spec = infer_spec(model)
    assert spec.experts == {"module": "model.layers.{}.mlp.experts", "router": "model.layers.{}.mlp.gate"}
    pack = editpack.edit(model, FACT, tokenizer=tok, **ROME)
    assert isinstance(pack.delta.modules["model.layers.1.mlp.experts.down_proj"], ExpertsDelta)
    assert rank_of(editpack.apply(model, pack), tok, FACT) == 0


def test_an_experts_delta_is_the_sum_of_its_experts_in_pefts_layout():
    factors = {1: LowRankDelta(torch.randn(5, 1), torch.randn(1, 7)), 3: LowRankDelta(torch.randn(5, 2),
                                                                                       torch.randn(2, 7))}
    delta = ExpertsDelta.from_experts(factors, 4, 5, 7)
    dense = delta.dense()
    assert delta.rank == 2 and delta.edited() == [1, 3] and not dense[0].any() and not dense[2].any()
    torch.testing.assert_close(dense[1], factors[1].dense())
    # PEFT's ParamWrapper reads A as (experts, r, in) and B as (out, r, experts)
    peft_dense = torch.einsum("ore,eri->eoi", delta.B.reshape(5, 2, 4), delta.A.reshape(4, 2, 7))
    torch.testing.assert_close(peft_dense, dense)
    assert abs(delta.norm() - float(dense.norm())) < 1e-4
    torch.testing.assert_close(delta.concat(delta).dense(), 2 * dense)
    assert delta.padded(3).rank == 3 and torch.equal(delta.padded(3).dense(), dense)


def test_moe_packs_stack_and_extend_expert_by_expert(tmp_path):
    model, tok = model_of("mixtral")
    first = editpack.edit(model, FACT, tokenizer=tok, **ROME)
    bridge = editpack.make_fact("the old {}", "london bridge", "tokyo")
    second = editpack.edit(model, bridge, tokenizer=tok, name="bridge", **ROME)
    name = "model.layers.1.mlp.experts.down_proj"
    stacked = editpack.load_pack(editpack.stack([first, second]).save(tmp_path / "s"))
    torch.testing.assert_close(stacked.delta.modules[name].dense(),
                               first.delta.modules[name].dense() + second.delta.modules[name].dense())
    grown = editpack.extend(model, first, [bridge], tokenizer=tok, **ROME)
    assert isinstance(grown.delta.modules[name], ExpertsDelta) and grown.delta.modules[name].rank == 2
    edited = editpack.apply(model, grown)
    assert rank_of(edited, tok, FACT) == 0 and rank_of(edited, tok, bridge) == 0


def test_the_stopping_rule_decides_per_expert_statistics(isolated_home):
    model, tok = model_of("mixtral")
    stats = compute_stats(model, "rome", corpus=CORPUS, tokens="auto", tokenizer=tok, layers=[1])
    source = stats.provenance
    assert source["rule"]["tolerance"] > 0 and len(source["checkpoints"]) >= 2
    assert "held-out keys moved less than" in source["stopped"] or "corpus ended" in source["stopped"]
    assert sum(source["expert_tokens"]["model.layers.1.mlp.experts.down_proj"]) == 2 * source["tokens"]
