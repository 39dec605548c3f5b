"""Several packs on one model: stacking, conflicts, switching off and removing, lineage, merging into one pack."""

import pytest
import torch
from peft import PeftModel

import editpack
from editpack import apply, edit, revert
from editpack.runtime.apply import applied, remove, set_enabled
from editpack.runtime.combine import stack
from editpack.errors import FingerprintMismatchError, PackConflictError

from tiny import FACT, TINY, logits, state, tiny_model, tiny_tokenizer

SECOND = editpack.make_fact("the old {}", "london bridge", "tokyo", "london")
RIVAL = editpack.make_fact("the famous {}", "eiffel tower", "berlin", "paris")


@pytest.fixture(params=["llama", "gpt2"])
def packs(request):
    model, tok = tiny_model(request.param), tiny_tokenizer()
    a = edit(model, FACT, tokenizer=tok, layers=[1], name="tower", **TINY)
    b = edit(model, SECOND, tokenizer=tok, layers=[2], name="bridge", **TINY)
    return model, tok, a, b


def test_two_packs_both_hold_and_equal_their_stack(packs):
    model, tok, a, b = packs
    both = apply(model, [a, b])
    assert [r.pack.ref for r in applied(both)] == ["tower@1.0.0", "bridge@1.0.0"]
    assert tok.decode(logits(both, tok, FACT.text).argmax()) == "rome"
    assert tok.decode(logits(both, tok, SECOND.text).argmax()) == "tokyo"
    expected = {t: logits(both, tok, t) for t in (FACT.text, SECOND.text, "the capital of germany is")}
    model = revert(both)

    one = stack([a, b], version="2.0.0")
    assert sorted(one.modules) == sorted(a.modules + b.modules)
    assert [f.subject for f in one.facts] == ["eiffel tower", "london bridge"]
    assert [p["relation"] for p in one.parents] == ["stacked", "stacked"] and not one.requires
    assert one.base.fingerprint == editpack.packs.base_model.describe_base(model, one.modules).fingerprint
    stacked = apply(model, one)
    for text, want in expected.items():
        torch.testing.assert_close(logits(stacked, tok, text), want, rtol=1e-5, atol=1e-5)
    revert(stacked)


def test_stack_of_packs_on_the_same_module_adds_ranks(packs, tmp_path):
    model, tok, a, _ = packs
    c = edit(model, SECOND, tokenizer=tok, layers=[1], name="bridge-same-layer", **TINY)
    one = stack([a, c])
    (module,) = one.modules
    assert one.delta.modules[module].rank == 2
    torch.testing.assert_close(one.delta.modules[module].dense(),
                               a.delta.modules[module].dense() + c.delta.modules[module].dense())
    one.save(tmp_path / "s")  # and it round-trips as an ordinary pack
    assert editpack.EditPack.load(tmp_path / "s").delta.modules[module].rank == 2


def test_conflicting_packs_are_refused_before_anything_changes(packs):
    model, tok, a, _ = packs
    rival = edit(model, RIVAL, tokenizer=tok, layers=[1], name="rival", **TINY)
    before = state(model)
    with pytest.raises(PackConflictError, match="tower@1.0.0 sets 'the famous eiffel tower' -> 'rome'.*rival@1.0.0"):
        apply(model, [a, rival])
    assert not isinstance(model, PeftModel) and not applied(model)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())
    with pytest.raises(PackConflictError, match="conflicting"):
        stack([a, rival])
    # An applied pack conflicts with a later one too.
    edited = apply(model, a)
    with pytest.raises(PackConflictError):
        apply(edited, rival)
    # The later pack may win: the wholly overridden earlier pack comes off.
    with pytest.warns(UserWarning, match="tower@1.0.0 is left out"):
        edited = apply(edited, rival, on_conflict="later")
    assert [r.pack.ref for r in applied(edited)] == ["rival@1.0.0"]
    assert tok.decode(logits(edited, tok, FACT.text).argmax()) == "berlin"
    revert(edited)


def test_partly_overridden_pack_is_refused(packs):
    model, tok, _, _ = packs
    two = edit(model, [FACT, SECOND], tokenizer=tok, layers=[1], name="two", **TINY)
    rival = edit(model, RIVAL, tokenizer=tok, layers=[1], name="rival", **TINY)
    with pytest.raises(PackConflictError, match="only partly overridden"):
        apply(model, [two, rival], on_conflict="later")


def test_switch_off_and_remove_one_pack_at_a_time(packs):
    model, tok, a, b = packs
    base_logits = logits(model, tok, FACT.text)
    original = state(model)
    only_a = apply(model, a)
    want_a = logits(only_a, tok, SECOND.text)
    model = revert(only_a)
    only_b = apply(model, b)
    want_b = logits(only_b, tok, FACT.text)
    model = revert(only_b)

    both = apply(model, [a, b])
    set_enabled(both, "bridge", False)
    assert [r.enabled for r in applied(both)] == [True, False]
    torch.testing.assert_close(logits(both, tok, SECOND.text), want_a, rtol=1e-6, atol=1e-6)
    set_enabled(both, "bridge@1.0.0", True)
    both = remove(both, "tower")
    assert [r.pack.ref for r in applied(both)] == ["bridge@1.0.0"]
    torch.testing.assert_close(logits(both, tok, FACT.text), want_b, rtol=1e-6, atol=1e-6)
    with pytest.raises(editpack.EditpackError, match="no pack 'tower' is applied"):
        remove(both, "tower")
    plain = remove(both, "bridge")
    assert not isinstance(plain, PeftModel) and not applied(plain)
    assert all(torch.equal(original[k], v) for k, v in state(plain).items())
    torch.testing.assert_close(logits(plain, tok, FACT.text), base_logits, rtol=0, atol=0)


def test_pack_made_on_an_edited_model_needs_its_parent(packs, tmp_path):
    model, tok, a, _ = packs
    edited = apply(model, a)
    child = edit(edited, SECOND, tokenizer=tok, layers=[1], name="child", **TINY)
    assert child.requires == [a.lineage_record("onto")]
    assert child.base.fingerprint == a.base.fingerprint  # both name the original weights
    model = revert(edited)
    child.save(tmp_path / "child")
    child = editpack.EditPack.load(tmp_path / "child")
    with pytest.raises(PackConflictError, match="child@1.0.0 was made on top of tower@1.0.0.*apply tower@1.0.0 first"):
        apply(model, child)
    assert not applied(model)
    chained = apply(model, [a, child])
    assert tok.decode(logits(chained, tok, FACT.text).argmax()) == "rome"
    assert tok.decode(logits(chained, tok, SECOND.text).argmax()) == "tokyo"
    with pytest.raises(PackConflictError, match="made on top of"):
        remove(chained, "tower")
    model = revert(chained)
    # The same parent merged into the weights counts too, and a stack of parent and child stands alone.
    merged = apply(model, a, merge=True)
    on_merged = apply(merged, child)
    assert tok.decode(logits(on_merged, tok, SECOND.text).argmax()) == "tokyo"
    model = revert(on_merged)
    assert not stack([a, child]).requires


def test_packs_for_other_base_weights_do_not_stack(packs):
    model, tok, a, _ = packs
    other = tiny_model(model.config.model_type, seed=3)
    foreign = edit(other, SECOND, tokenizer=tok, layers=[1], name="foreign", **TINY)
    with pytest.raises(PackConflictError, match="different base weights of .*mlp"):
        stack([a, foreign])
    with pytest.raises(FingerprintMismatchError):
        apply(model, [a, foreign])


def test_revert_through_the_plain_model_object_unloads_the_adapters(packs):
    model, tok, a, _ = packs
    original = state(model)
    apply(model, a)  # PEFT injects its layers into `model` in place; the caller kept only the plain object
    plain = revert(model)
    assert plain is model and not applied(plain)
    assert not any("lora" in k for k in state(plain)) and set(state(plain)) == set(original)
