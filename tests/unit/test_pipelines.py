"""An edited model in ``transformers.pipeline``, the three documented ways (tiny model saved to a folder)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

import editpack

from tiny import FACT, TINY, logits, tiny_model, tiny_tokenizer

OTHER = "the capital of germany is"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    tiny_model("llama").save_pretrained(root / "m")
    tiny_tokenizer().save_pretrained(root / "m")
    model, tok = editpack.load_model(str(root / "m"))
    pack = editpack.edit(model, FACT, layers=[1], **TINY)
    pack.save(root / "p")
    edited = editpack.apply(model, pack)
    expected = {t: logits(edited, tok, t) for t in (FACT.text, OTHER)}
    editpack.revert(edited)
    return root, expected


def first_word(result):
    return result[0]["generated_text"].split()[0]


def test_editpack_pipeline_helper(saved, monkeypatch):
    root, _ = saved
    monkeypatch.chdir(root)  # the pack names its local base by folder name ("m"), found from here
    pipe = editpack.pipeline(str(root / "m"), [str(root / "p")])
    out = pipe([FACT.text, OTHER], max_new_tokens=1, do_sample=False, return_full_text=False, batch_size=2)
    assert first_word(out[0]) == "rome"
    base = editpack.pipeline(str(root / "m"))  # no packs: the base model
    assert first_word(base(FACT.text, max_new_tokens=1, do_sample=False, return_full_text=False)) != "rome"
    # The model the first pack records is loaded when none is named.
    assert first_word(editpack.pipeline(None, [str(root / "p")])(FACT.text, max_new_tokens=1, do_sample=False,
                                                                  return_full_text=False)) == "rome"


def test_peft_model_passed_to_transformers_pipeline(saved):
    root, _ = saved
    model, tok = editpack.load_model(str(root / "m"))
    edited = editpack.apply(model, editpack.EditPack.load(root / "p"))
    pipe = pipeline("text-generation", model=edited, tokenizer=tok)
    assert first_word(pipe(FACT.text, max_new_tokens=1, do_sample=False, return_full_text=False)) == "rome"


def test_auto_model_from_pack_dir_through_transformers_peft_integration(saved, monkeypatch):
    root, expected = saved
    # base_model_name_or_path is the base's portable name ("m", the folder's name: no local path is recorded),
    # which transformers resolves from the working directory; a Hub base is resolved through the Hub instead
    # (tests/test_hub.py).
    monkeypatch.chdir(root)
    model = AutoModelForCausalLM.from_pretrained(root / "p")  # reads base_model_name_or_path, loads the adapter
    tok = tiny_tokenizer()
    for text, want in expected.items():
        torch.testing.assert_close(logits(model, tok, text), want, rtol=1e-5, atol=1e-5)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    assert first_word(pipe(FACT.text, max_new_tokens=1, do_sample=False, return_full_text=False)) == "rome"
