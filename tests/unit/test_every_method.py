"""One battery for every registered method, with the tiny settings the method declares beside it
(``EditMethod.tiny_settings``; ``editpack.testing``): edit, save, load, apply, revert bit for bit, plain PEFT
loading where the pack is a PEFT adapter, and a Hub round trip. A new method is covered by registering it."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import editpack
from editpack.methods import REGISTRY
from editpack.share.hub import pull, push
from editpack.testing import missing_packages, tiny_edit_settings, tiny_facts, tiny_model, tiny_tokenizer

from tiny import logits, state


@pytest.fixture(params=sorted(REGISTRY))
def made(request, tmp_path):
    """``(method, facts, tokenizer, the model it was made on, the saved pack's folder, the pack)``."""
    method = request.param
    missing = missing_packages(method)
    if missing:
        pytest.skip(f"{method} needs {', '.join(missing)}")
    tok = tiny_tokenizer()
    facts = tiny_facts(REGISTRY[method].tiny_fact_count)
    model = tiny_model()
    model.editpack_tokenizer = tok
    pack = editpack.edit(model, facts, method, tokenizer=tok, **tiny_edit_settings(method, tmp_path, tokenizer=tok))
    return method, facts, tok, model, pack.save(tmp_path / "pack"), pack


def test_save_and_load_keep_the_pack(made):
    method, facts, _, _, path, pack = made
    loaded = editpack.load_pack(path)
    assert type(loaded) is type(pack) and loaded.method == method
    assert loaded.content_id == pack.content_id and [f.to_dict() for f in loaded.facts] == [
        f.to_dict() for f in facts]
    assert set(loaded.files) >= set(type(loaded).payload_files) | {"README.md"}


def test_apply_changes_the_model_and_revert_restores_it_bit_for_bit(made):
    _, facts, tok, model, path, _ = made
    before = state(model)
    base = editpack.generate(model, tok, [facts[0].text], max_new_tokens=2), logits(model, tok, facts[0].text)
    edited = editpack.apply(model, editpack.load_pack(path))
    assert [r.pack.ref for r in editpack.applied(edited)] == [editpack.load_pack(path).ref]
    after = editpack.generate(edited, tok, [facts[0].text], max_new_tokens=2), logits(edited, tok, facts[0].text)
    assert after[0] != base[0] or not torch.equal(after[1], base[1])  # memory packs change generation only
    plain = editpack.revert(edited)
    assert not editpack.applied(plain)
    after = state(plain)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_peft_adapter_pack_loads_with_plain_peft(made):
    """Plain PEFT gives what editpack's apply gives; for a routed side memory (WISE), whose router PEFT does not
    know, what the delta added to the weights everywhere gives."""
    _, facts, tok, _, path, pack = made
    if not pack.is_peft_adapter:
        pytest.skip(f"a {pack.kind} pack is not a PEFT adapter")
    if pack.hooks_modules:
        everywhere = tiny_model()
        with torch.no_grad():
            for module, delta in pack.delta.modules.items():
                everywhere.get_submodule(module).weight += delta.dense()
        ours = logits(everywhere, tok, facts[0].text)
    else:
        ours = logits(editpack.apply(tiny_model(), editpack.load_pack(path)), tok, facts[0].text)
    theirs = logits(PeftModel.from_pretrained(tiny_model(), str(path)).eval(), tok, facts[0].text)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_the_pack_round_trips_through_the_hub(made, hub, tmp_path):
    method, _, _, _, path, pack = made
    pushed = push(path, f"user/{method}")
    assert pushed.created
    pulled = pull(f"user/{method}@{pack.version}", tmp_path / "pulled")
    assert pulled.content_id == pack.content_id and pulled.kind == pack.kind
    assert {name: digest for name, digest in pulled.files.items()} == editpack.load_pack(path).files
