"""Chat form on the real SmolLM2-135M-Instruct: its template, the answer after the header, an IKE pack in chat form."""

import torch
from click.testing import CliRunner

import editpack
from editpack.chat import chat_prompt
from editpack.cli.main import main
from editpack.methods.targets import target_batch
from editpack.model.generation import continuation, next_token_logits
from editpack.model.scoring import answer_ids


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_smollm2_answers_in_chat_form(smollm2):
    result = run("generate", "--chat", "--max-new-tokens", "8", "What is the capital of France?")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "What is the capital of France?"
    assert "The capital of France is Paris" in result.output.splitlines()[1]


def test_smollm2_answers_after_the_chat_header_with_no_space(smollm2):
    model, tok = smollm2
    prompt = chat_prompt(tok, "What is the capital of France?")
    assert prompt.endswith("assistant\n")
    for text, answer in ((prompt, "Paris"), ("The capital of France is", " Paris")):  # as the text tokenizes
        assert tok(text + answer)["input_ids"] == tok(text)["input_ids"] + answer_ids(tok, "Paris", text)
    assert answer_ids(tok, "Paris", prompt) != answer_ids(tok, "Paris")
    # what the model writes there starts with no space: "The" 15 %, " The" 0.002 %
    probs = torch.softmax(next_token_logits(model, tok, [prompt], 1)[0], -1)
    assert probs[answer_ids(tok, "The", prompt)[0]] > 1000 * probs[answer_ids(tok, "The")[0]]
    for text in (prompt, "The capital of France is"):  # the edit's targets are tokenized the same way
        batch = target_batch(tok, [editpack.make_fact(text.replace("France", "{}"), "France", "Rome")], "cpu")
        assert batch.tokens.tolist() == answer_ids(tok, "Rome", text)
        assert batch.inputs["input_ids"][0].tolist() == tok(text + continuation(text, "Rome"))["input_ids"]
    fact = editpack.make_fact("What is the capital of {}?", "France", "Rome")
    memory = editpack.edit(model, fact, "serac", tokenizer=tok, route="answer")
    edited = editpack.apply(model, memory, tokenizer=tok)
    try:  # the answer route forces the target as the model would write it after the text it is shown
        chat, plain = edited.teacher_forcing([chat_prompt(tok, fact.text), fact.text])
        assert chat.forced == answer_ids(tok, "Rome", chat.text) != plain.forced == answer_ids(tok, "Rome")
        assert editpack.generate(edited, tok, chat_prompt(tok, fact.text), max_new_tokens=1) == "Rome"
    finally:
        editpack.revert(edited)


def test_smollm2_ike_pack_answers_the_president_question_in_chat_form(smollm2, tmp_path):
    model, tok = smollm2
    fact = {"prompt": "Who is the president of {}?", "subject": "the United States", "target_new": "Taylor Swift"}
    editpack.edit(model, fact, "ike").save(tmp_path / "potus")
    result = run("generate", "--chat", "--compare", "--pack", tmp_path / "potus", "--max-new-tokens", "10",
                 "Who is the president of the United States?", "Who is the president of France?",
                 "What is the capital of France?")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    us, france, capital = (lines[k:k + 3] for k in (0, 3, 6))
    assert "Taylor Swift" in us[2] and "Taylor Swift" not in us[1]
    answer = lambda line: line.split(":", 1)[1].strip()  # noqa: E731
    assert answer(france[1]) == answer(france[2]) and "François" in france[1]  # out of scope: as before
    assert answer(capital[1]) == answer(capital[2]) and "Paris" in capital[1]
