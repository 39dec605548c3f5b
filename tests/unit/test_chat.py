"""Chat form (``editpack.chat``): prompts and facts in a model's chat template, and edits, editors and generation
made in it (tiny random models with a word-level template; SmolLM2's own template for what it answers)."""

import json

import pytest
from click.testing import CliRunner

import editpack
from editpack.evaluation import side_effects
from editpack.packs.card import render_card
from editpack.chat import ChatFrame, chat_fact, chat_prompt, check_plain_routing, facts_form, plain_fact
from editpack.evaluation.report import evaluate_pack, rerun
from editpack.cli.main import main
from editpack.errors import EditpackError
from editpack.facts import Fact, Probe
from editpack.methods.training import TrainSettings

from tiny import FACT, TINY, tiny_model, tiny_tokenizer
from editpack.packs.memory.routes import ike_demonstrations, ike_text

#: A chat template for the tiny tokenizer: each turn its role (an unknown word) and text; the answer's header a line
#: break, which the tokenizer drops (a tiny random model's edit takes only when the prompt ends on the subject).
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}{{ '\\n' }}{% endif %}")
RECORDS = [editpack.make_fact("the famous {}", s, c, paraphrases=[f"the big {s}"],
                              neighborhood=[("the famous louvre", "paris")])
           for s, c in [("eiffel tower", "rome"), ("london bridge", "tokyo"), ("river", "madrid"),
                        ("museum", "berlin"), ("lake", "london"), ("mountain", "paris")]]
ROME_SETTINGS = ["--set", "mom2_adjustment=false", "--set", "context_template_lengths=[[3,2]]",
                 "--set", "clamp_norm_factor=10000", "--set", "v_weight_decay=0"]


def ike_prompt(memory, fact, prompt, k):
    """The in-scope prompt as IKE rewrites it: ``k`` demonstrations, then the new fact and the prompt."""
    return ike_text(ike_demonstrations(memory, fact, k), fact, prompt)


def chat_tokenizer(template: str = TEMPLATE):
    tok = tiny_tokenizer()
    tok.chat_template = template
    return tok


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_chat_fact_puts_every_prompt_in_the_template_and_the_manifest_keeps_it():
    tok = chat_tokenizer()
    fact = editpack.make_fact("the famous {}", "eiffel tower", "rome", "paris", paraphrases=["the big eiffel tower"],
                              neighborhood=[("the louvre is in", "paris")], portability=[("the tower city", "rome")])
    chatted = chat_fact(tok, fact)
    assert chatted.prompt == "user the famous {} \n" and chatted.text == "user the famous eiffel tower \n"
    assert (chatted.subject, chatted.target_new, chatted.target_true) == ("eiffel tower", "rome", "paris")
    assert chatted.paraphrases == ("user the big eiffel tower \n",)
    assert chatted.neighborhood == (Probe("user the louvre is in \n", "paris"),)
    assert chatted.portability == (Probe("user the tower city \n", "rome"),)
    assert Fact.from_dict(chatted.to_dict()) == chatted  # the line break ending the template survives a manifest
    assert editpack.make_fact("  the famous eiffel tower \t", "eiffel tower", "rome").prompt == "the famous {}"


def test_chat_form_needs_a_template_that_keeps_the_subjects_place_alone():
    with pytest.raises(EditpackError, match="chat form needs a chat template.*leave out --chat"):
        chat_prompt(tiny_tokenizer(), "the famous eiffel tower")
    braces = chat_tokenizer("system {} " + TEMPLATE)
    with pytest.raises(EditpackError, match="writes 2 '{}' around the prompt"):
        chat_fact(braces, FACT)


def test_an_edit_in_chat_form_is_made_and_read_in_that_form(tmp_path):
    model, tok = tiny_model("llama"), chat_tokenizer()
    pack = editpack.edit(model, FACT, tokenizer=tok, layers=[1], chat=True, **TINY)
    assert pack.facts[0].text == chat_prompt(tok, FACT.text) == "user the famous eiffel tower \n"
    loaded = editpack.load_pack(pack.save(tmp_path / "pack"))
    assert loaded.facts == pack.facts
    edited = editpack.apply(model, loaded)
    assert editpack.generate(edited, tok, chat_prompt(tok, FACT.text), max_new_tokens=1).split() == ["rome"]
    editpack.revert(edited)
    plain = editpack.edit(model, FACT, tokenizer=tok, layers=[1], **TINY)
    assert plain.facts[0].text == "the famous eiffel tower"
    (module, delta), = plain.delta.modules.items()
    assert not delta.dense().allclose(loaded.delta.modules[module].dense())  # computed on the chat text


def test_extending_a_pack_in_chat_form_adds_chat_facts():
    model, tok = tiny_model("llama"), chat_tokenizer()
    first = editpack.edit(model, FACT, tokenizer=tok, layers=[1], chat=True, **TINY)
    second = editpack.extend(model, first, editpack.make_fact("the famous {}", "london bridge", "tokyo"),
                             tokenizer=tok, chat=True)
    assert [f.text for f in second.facts] == ["user the famous eiffel tower \n",
                                              "user the famous london bridge \n"]


def test_a_pack_extends_with_facts_in_its_own_form(tiny_dir, tmp_path):
    model, tok = tiny_model("llama"), chat_tokenizer()
    chatted = editpack.edit(model, FACT, tokenizer=tok, layers=[1], chat=True, name="chatty", **TINY)
    plain = editpack.edit(model, FACT, tokenizer=tok, layers=[1], name="plainly", **TINY)
    other = editpack.make_fact("the famous {}", "london bridge", "tokyo")
    with pytest.raises(EditpackError, match=r"chatty@1.0.0 holds its facts in chat form; new facts take its form "
                                            r"\(give chat / --chat\)"):
        editpack.extend(model, chatted, other, tokenizer=tok)
    with pytest.raises(EditpackError, match=r"plainly@1.0.0 holds its facts in plain form.*\(leave out chat"):
        editpack.extend(model, plain, other, tokenizer=tok, chat=True)
    assert facts_form(tok, chatted.facts) == "chat" and facts_form(tok, plain.facts) == "plain"
    assert facts_form(tok, [*chatted.facts, *plain.facts]) == "mixed"  # a stack of both takes either
    assert facts_form(tok, []) == facts_form(tiny_tokenizer(), chatted.facts) == "plain"
    assert plain_fact(ChatFrame.of(tok), chatted.facts[0]) == plain.facts[0]
    tok.save_pretrained(tiny_dir)
    result = run("edit", "--model", tiny_dir, "--prompt", "the famous {}", "--subject", "eiffel tower", "--target",
                 "rome", "--layers", "1", *ROME_SETTINGS, "--chat", "--no-eval", "-o", tmp_path / "p")
    assert result.exit_code == 0, result.output
    result = run("edit", "--onto", tmp_path / "p", "--model", tiny_dir, "--prompt", "the famous {}", "--subject",
                 "london bridge", "--target", "tokyo", "--no-eval", "-o", tmp_path / "next")
    assert result.exit_code != 0 and "holds its facts in chat form" in result.output, result.output
    assert not (tmp_path / "next").exists()


def test_a_pack_in_chat_form_is_measured_in_chat_form_and_the_card_says_so(monkeypatch, isolated_home):
    model, tok = tiny_model("llama"), chat_tokenizer()
    fact = editpack.make_fact("the mother tongue of {} is", "eiffel tower", "english")  # a CounterFact phrasing
    asked = []

    def recording(model, tokenizer, prompts, **kwargs):
        asked.extend([prompts] if isinstance(prompts, str) else prompts)
        return real(model, tokenizer, prompts, **kwargs)

    def recording_first(model, tokenizer, prompts, **kwargs):
        asked.extend(prompts)
        return real_first(model, tokenizer, prompts, **kwargs)

    real, real_first = side_effects.generate, side_effects.generate_with_first_logits
    monkeypatch.setattr(side_effects, "generate", recording)
    monkeypatch.setattr(side_effects, "generate_with_first_logits", recording_first)
    settings = side_effects.SuiteSettings(locality=4, same_subject=2, fluency_prompts=2, fluency_tokens=4,
                                          heldout_tokens=16)
    for chat in (True, False):
        pack = editpack.edit(model, fact, tokenizer=tok, layers=[1], chat=chat, **TINY)
        asked.clear()
        result = evaluate_pack(model, tok, pack, suite_settings=side_effects.SuiteSettings(
            **{**settings.__dict__, "form": "chat" if chat else "plain"}))
        assert result["generalization_origin"] == {"paraphrases": 0, "relation_templates": 1, "not_measured": 0}
        # before and after (a private home: no cached base side): locality, fluency and, in its batch, the edit
        # prompt's continuation; the subject's other relations were answered by the probes, in the same form
        assert len(asked) == 2 * (4 + 2 + 1)
        assert [p.startswith("user ") and p.endswith(" \n") for p in asked] == [chat] * len(asked)
        assert result["side_effects"]["claims"]["same_subject_unchanged"]["n"] == 2
        subject = [ChatFrame.of(tok).message(p) if chat else p for p in asked if "eiffel tower" in p]
        assert len(subject) == 2 and not any("user" in p or "{}" in p for p in subject)  # asked by the user's text
        assert ("Asked in chat form" in render_card(_with(pack, result))) is chat
    with pytest.raises(ValueError, match="form must be one of plain, chat"):
        side_effects.SuiteSettings(form="markdown")


def _with(pack, evaluation):
    pack.evaluation = evaluation
    return pack


def test_a_chat_form_evaluation_chooses_its_form_and_reruns():
    model, tok = tiny_model("llama"), chat_tokenizer()
    fact = editpack.make_fact("the mother tongue of {} is", "eiffel tower", "english")
    pack = editpack.edit(model, fact, tokenizer=tok, layers=[1], chat=True, **TINY)
    paraphrased, origin = side_effects.with_default_paraphrases(pack.facts, tok)
    assert origin["relation_templates"] == 1 and paraphrased[0].paraphrases
    assert all(p.startswith("user ") and "eiffel tower" in p for p in paraphrased[0].paraphrases)
    pack.evaluation = evaluate_pack(model, tok, pack, protocols=["prob_compare"])
    assert pack.evaluation["side_effects"]["settings"]["form"] == "chat"
    checks = rerun(model, tok, pack)
    assert checks and all(c.ok for c in checks), [str(c) for c in checks if not c.ok]
    plain = editpack.edit(model, fact, tokenizer=tok, layers=[1], **TINY)
    assert evaluate_pack(model, tok, plain, protocols=["prob_compare"])["side_effects"]["settings"]["form"] == "plain"


def test_memory_packs_keep_their_facts_plain(tmp_path):
    model, tok = tiny_model("llama"), chat_tokenizer()
    for method in ("serac", "ike"):
        with pytest.raises(EditpackError, match=f"{method} makes memory packs, which keep their facts plain"):
            editpack.edit(model, FACT, method, tokenizer=tok, chat=True)
    memory = editpack.edit(model, FACT, "serac", tokenizer=tok, name="memo")
    with pytest.raises(EditpackError, match="memo 1.0.0 is a memory pack: it keeps its facts plain"):
        check_plain_routing([memory])
    with pytest.raises(EditpackError, match="memory pack"):
        editpack.extend(model, memory, FACT, tokenizer=tok, chat=True)
    grown = editpack.extend(model, memory, editpack.make_fact("the famous {}", "river", "tokyo"))  # no tokenizer
    assert [f.subject for f in grown.facts] == ["eiffel tower", "river"]
    for command in (["edit", "--method", "ike"], ["bench", "--method", "serac", "--data", "x.json"]):
        result = run(*command, "--model", "/nonexistent/model-folder", "--chat", "--prompt", "the famous {}",
                     "--subject", "eiffel tower", "--target", "rome", "-o", tmp_path / "p") if command[0] == "edit" \
            else run(*command, "--model", "/nonexistent/model-folder", "--chat")
        assert result.exit_code != 0 and "makes memory packs" in result.output, result.output
    assert not (tmp_path / "p").exists()


def test_a_memory_pack_routes_a_chat_prompt_by_its_user_turn_and_answers_inside_it():
    model, tok = tiny_model("llama"), chat_tokenizer()
    frame = ChatFrame.of(tok)
    assert frame == ChatFrame("user ", " \n") and frame.message(chat_prompt(tok, "the famous louvre")) == "the famous louvre"
    assert frame.message("the famous louvre") is None and ChatFrame.of(tiny_tokenizer()) is None
    assert ChatFrame.of(chat_tokenizer("{{ raise_exception('a system turn first') }}")) is None  # routed as plain
    memory = editpack.edit(model, [FACT], "serac", tokenizer=tok, route="answer", relation_margin=None)
    edited = editpack.apply(model, memory, tokenizer=tok)
    prompts = [chat_prompt(tok, FACT.text), chat_prompt(tok, "the capital of germany is"), FACT.text]
    assert [r is not None for r in edited.route(prompts)] == [True, False, True]
    chat, outside, plain = edited.teacher_forcing(prompts)
    assert chat.text == frame.wrap(plain.text) and "New fact: the famous eiffel tower rome." in chat.text
    assert chat.forced == plain.forced == tok(" rome", add_special_tokens=False)["input_ids"]
    assert outside.text == prompts[1] and not outside.forced


def test_an_editor_trained_in_chat_form_records_it():
    model, tok = tiny_model("llama"), chat_tokenizer()
    settings = TrainSettings(max_steps=2, batch_size=2, held_out=2, eval_every=2, checkpoint_every=2)
    editor = editpack.train(model, "mend", RECORDS, tokenizer=tok, settings=settings, progress=False, chat=True,
                            layers=[2, 3], rank=8)
    plain = editpack.train(model, "mend", RECORDS, tokenizer=tok, settings=settings, progress=False,
                           layers=[2, 3], rank=8)
    assert editor.training["form"] == "chat" and "form" not in plain.training
    assert editor.content_id != plain.content_id  # trained on other text


def test_cli_edits_and_generates_in_chat_form(tiny_dir, tmp_path):
    tok = chat_tokenizer()
    tok.save_pretrained(tiny_dir)  # the folder's tokenizer now has the template
    result = run("edit", "--model", tiny_dir, "--prompt", "the famous {}", "--subject", "eiffel tower", "--target",
                 "rome", "--layers", "1", *ROME_SETTINGS, "--chat", "--no-eval", "-o", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert "(1 fact(s), rome, chat form)" in result.output
    manifest = json.loads((tmp_path / "p" / "editpack.json").read_text())
    assert manifest["facts"][0]["prompt"] == "user the famous {} \n"
    result = run("generate", "--model", tiny_dir, "--pack", tmp_path / "p", "--chat", "--compare",
                 "--max-new-tokens", "1", "the famous eiffel tower")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["the famous eiffel tower", f"  base:   {_base_answer(tiny_dir)!r}",
                                          "  edited: 'rome'"]
    result = run("generate", "--model", tiny_dir, "--pack", tmp_path / "p", "--chat", "--max-new-tokens", "1",
                 "the famous eiffel tower")
    assert result.output.splitlines() == ["the famous eiffel tower", "  'rome'"]


def _base_answer(folder) -> str:
    model, tok = editpack.load_model(str(folder))
    return editpack.generate(model, tok, chat_prompt(tok, "the famous eiffel tower"), max_new_tokens=1)






def test_cli_trains_an_editor_in_chat_form_and_edits_with_it(tiny_dir, tmp_path):
    chat_tokenizer().save_pretrained(tiny_dir)
    data = tmp_path / "records.jsonl"
    data.write_text("\n".join(json.dumps(f.to_dict()) for f in RECORDS))
    out = tmp_path / "mend-chat"
    result = run("train", "mend", "--model", tiny_dir, "--data", data, "--max-steps", "2", "--batch-size", "2",
                 "--held-out", "2", "--eval-every", "2", "--layers", "2,3", "--set", "rank=8", "--chat", "-o", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "editpack.json").read_text())["editor"]["training"]["form"] == "chat"
    result = run("edit", "--model", tiny_dir, "--method", "mend", "--editor", out, "--prompt", "the famous {}",
                 "--subject", "eiffel tower", "--target", "rome", "--chat", "--no-eval", "-o", tmp_path / "pack")
    assert result.exit_code == 0 and "(1 fact(s), mend, chat form)" in result.output, result.output
    assert editpack.load_pack(tmp_path / "pack").facts[0].text == "user the famous eiffel tower \n"


def test_a_card_shows_a_long_chat_prompts_question():
    from editpack.packs.card import _cell

    prompt = "system " + "you are a helpful assistant " * 8 + "user Who is the president of {}? assistant\n"
    cell = _cell(prompt)
    assert len(cell) <= 120 and cell.startswith("system you are a helpful assistant")
    assert " … " in cell and cell.endswith("user Who is the president of {}? assistant ")  # the line break: a space


def test_bench_edits_each_record_and_with_chat_scores_it_in_chat_form(tiny_dir, tmp_path, test_data):
    chat_tokenizer().save_pretrained(tiny_dir)
    data = f"counterfact:{test_data / 'counterfact-edit-25.json'}"
    results = {}
    for form in ("plain", "chat"):
        out = tmp_path / f"{form}.json"
        result = run("bench", "--model", tiny_dir, "--data", data, "--limit", "2", *ROME_SETTINGS, "--set",
                     "layers=[1]", "--protocol", "prob_compare", "--out", out, *(["--chat"] if form == "chat" else []))
        assert result.exit_code == 0, result.output
        results[form] = json.loads(out.read_text())
    assert results["chat"]["form"] == "chat" and "form" not in results["plain"]
    for form, result in results.items():
        assert result["n_facts"] == 2 and result["method"] == "rome"
        assert result["protocols"]["prob_compare"]["reliability"]["n"] == 2
    plain, chat = (results[form]["examples"][0]["prompt"] for form in ("plain", "chat"))
    assert chat == f"user {plain} \n"  # what was edited and scored
    result = run("bench", "--model", "/nonexistent/model-folder", "--method", "serac", "--data", data, "--chat")
    assert result.exit_code != 0 and "serac makes memory packs" in result.output




def test_an_ike_pack_shows_its_demonstrations_to_a_chat_prompt_as_earlier_exchanges():
    from editpack.packs.memory.routes import IKE_DEMONSTRATIONS, ike_examples

    model, tok = tiny_model("llama"), chat_tokenizer()
    tower = editpack.make_fact("the famous {}", "eiffel tower", "rome", paraphrases=["the big eiffel tower is in"])
    bridge = editpack.make_fact("the old {}", "london bridge", "tokyo", paraphrases=["the london bridge is in"],
                                neighborhood=[("the old tower", "london")])
    memory = editpack.edit(model, [tower, bridge], "ike", tokenizer=tok, relation_margin=None)
    edited = editpack.apply(model, memory, tokenizer=tok)
    chat, plain = edited.teacher_forcing([chat_prompt(tok, tower.text), tower.text])
    assert ike_examples(memory, tower, IKE_DEMONSTRATIONS) == [
        ("New Fact: the old london bridge tokyo\nPrompt: the old london bridge", "tokyo"),
        ("New Fact: the old london bridge tokyo\nPrompt: the london bridge is in", "tokyo"),
        ("New Fact: the old london bridge tokyo\nPrompt: the old tower", "london")]
    turns = "".join(f"user {q} assistant {a} " for q, a in ike_examples(memory, tower, IKE_DEMONSTRATIONS))
    assert chat.text == turns + "user New Fact: the famous eiffel tower rome\nPrompt: the famous eiffel tower \n"
    assert chat.bare == turns + "user Prompt: the famous eiffel tower \n"  # the contrast: the same without the fact
    assert plain.text == ike_prompt(memory, tower, tower.text, IKE_DEMONSTRATIONS)  # plain prompts: one text, as before


def test_eval_on_data_in_chat_form_is_recorded_and_reruns(tiny_dir, tmp_path, test_data):
    chat_tokenizer().save_pretrained(tiny_dir)
    data = f"counterfact:{test_data / 'counterfact-edit-25.json'}"
    pack = tmp_path / "p"
    result = run("edit", "--model", tiny_dir, "--prompt", "the famous {}", "--subject", "eiffel tower", "--target",
                 "rome", "--layers", "1", *ROME_SETTINGS, "--chat", "--no-eval", "-o", pack)
    assert result.exit_code == 0, result.output
    result = run("eval", pack, "--model", tiny_dir, "--chat")
    assert result.exit_code != 0 and "--chat puts --data's facts in chat form" in result.output
    result = run("eval", pack, "--model", tiny_dir, "--data", data, "--limit", "2", "--chat", "--protocol",
                 "prob_compare", "--json")
    assert result.exit_code == 0, result.output
    evaluation = json.loads((pack / "editpack.json").read_text())["evaluation"]
    assert evaluation["settings"]["chat"] is True
    assert all(e["prompt"].startswith("user ") and e["prompt"].endswith(" \n") for e in evaluation["examples"])
    again = run("verify", pack, "--rerun", "--model", tiny_dir, "--data", data, "--limit", "2")
    assert again.exit_code == 0, again.output
    assert "claims reproduced" in again.output
