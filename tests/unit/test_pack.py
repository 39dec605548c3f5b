"""Edit packs on tiny random models: round trips, PEFT compatibility, exact revert, fingerprints, atomicity."""

import json

import pytest
import torch
from peft import PeftModel

import editpack
from editpack import EditPack, apply, edit, revert
from editpack.errors import FingerprintMismatchError, PackFormatError
from editpack.packs.weights import ADAPTER_WEIGHTS
from editpack.packs.manifest import MANIFEST

from tiny import FACT, TINY, logits, state, tiny_model, tiny_tokenizer

@pytest.fixture(params=["llama", "gpt2"])
def setup(request):
    model, tok = tiny_model(request.param), tiny_tokenizer()
    return model, tok


def test_edit_leaves_the_model_unchanged_and_moves_the_target(setup):
    model, tok = setup
    before = state(model)
    pack = edit(model, FACT, tokenizer=tok, layers=[1], **TINY)
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "edit() must not change the model"
    assert [d.rank for d in pack.delta.modules.values()] == [1]
    edited = apply(model, pack)
    assert tok.decode(logits(edited, tok, FACT.text).argmax()) == "rome"
    revert(edited)


def test_several_facts_stack_as_rank(setup):
    model, tok = setup
    second = editpack.make_fact("the old {}", "london bridge", "tokyo", "london")
    pack = edit(model, [FACT, second], tokenizer=tok, layers=[1], **TINY)
    assert [d.rank for d in pack.delta.modules.values()] == [2]
    assert pack.name.startswith("rome-eiffel-tower-and-1-more")


def test_save_load_round_trip_and_manifest(setup, tmp_path):
    model, tok = setup
    pack = edit(model, FACT, tokenizer=tok, layers=[1, 2], version="1.2.0", **TINY)
    pack.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "editpack.json"]
    manifest = json.loads((tmp_path / "p" / MANIFEST).read_text())
    assert manifest["version"] == "1.2.0" and manifest["method"] == "rome"
    assert manifest["base_model"]["fingerprint"].startswith("sha256:")
    assert manifest["hyperparameters"]["layers"] == [1, 2]
    assert len(manifest["hyperparameters"]["context_templates"]) == 3
    assert manifest["facts"][0]["target_new"] == "rome"
    assert set(manifest["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    loaded = EditPack.load(tmp_path / "p")
    for name, delta in pack.delta.modules.items():
        assert torch.equal(loaded.delta.modules[name].A, delta.A) and torch.equal(loaded.delta.modules[name].B, delta.B)
    assert loaded.facts == pack.facts and loaded.base == pack.base
    card = (tmp_path / "p" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "eiffel tower" in card


def test_plain_peft_loading_matches_apply(setup, tmp_path):
    model, tok = setup
    pack = edit(model, FACT, tokenizer=tok, layers=[1], **TINY)
    pack.save(tmp_path / "p")
    edited = apply(model, EditPack.load(tmp_path / "p"))
    ours = logits(edited, tok, FACT.text)
    base = revert(edited)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "p"))
    torch.testing.assert_close(logits(peft_model, tok, FACT.text), ours, rtol=0, atol=0)
    peft_model.unload()


def test_merge_matches_unmerged_and_revert_is_bit_exact(setup):
    model, tok = setup
    original = state(model)
    base_logits = logits(model, tok, FACT.text)
    pack = edit(model, FACT, tokenizer=tok, layers=[1], **TINY)
    first = apply(model, pack)
    unmerged = logits(first, tok, FACT.text)
    model = revert(first)
    for where in ("unmerged", "merged"):
        edited = apply(model, pack, merge=where == "merged")
        torch.testing.assert_close(logits(edited, tok, FACT.text), unmerged, rtol=1e-5, atol=1e-5)
        (record,) = editpack.applied(edited)
        assert record.pack is pack and record.merged == (where == "merged")
        model = revert(edited)
        assert not isinstance(model, PeftModel) and not editpack.applied(model)
        assert not hasattr(model, "peft_config")
        now = state(model)
        assert set(now) == set(original) and all(torch.equal(now[k], original[k]) for k in original), where
        torch.testing.assert_close(logits(model, tok, FACT.text), base_logits, rtol=0, atol=0)


def test_fingerprint_mismatch_is_refused_unless_overridden(setup):
    model, tok = setup
    pack = edit(model, FACT, tokenizer=tok, layers=[1], **TINY)
    other = tiny_model(model.config.model_type, seed=1)
    with pytest.raises(FingerprintMismatchError, match="it is a different model"):
        apply(other, pack)
    assert not isinstance(other, PeftModel) and not editpack.applied(other)  # nothing was applied
    forced = apply(other, pack, check=False)
    assert isinstance(forced, PeftModel)


def test_fingerprint_ignores_dtype_round_trip(setup):
    model, tok = setup
    pack = edit(model, FACT, tokenizer=tok, layers=[1], **TINY)
    model = model.to(torch.bfloat16)
    editpack.apply(model, pack)  # same weights in bf16: accepted


def test_tampered_pack_is_refused(setup, tmp_path):
    model, tok = setup
    edit(model, FACT, tokenizer=tok, layers=[1], **TINY).save(tmp_path / "p")
    weights = tmp_path / "p" / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(PackFormatError, match="adapter_model.safetensors does not match its sha256"):
        EditPack.load(tmp_path / "p")


def test_failed_save_leaves_nothing(setup, tmp_path, monkeypatch):
    model, tok = setup
    pack = edit(model, FACT, tokenizer=tok, layers=[1], **TINY)
    import editpack.packs.artifact

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(editpack.packs.artifact, "render_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        pack.save(tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_not_overwritten_by_default(setup, tmp_path):
    model, tok = setup
    pack = edit(model, FACT, tokenizer=tok, layers=[1], **TINY)
    pack.save(tmp_path / "p")
    with pytest.raises(FileExistsError, match="already exists"):
        pack.save(tmp_path / "p")
    pack.save(tmp_path / "p", overwrite=True)
    EditPack.load(tmp_path / "p")


def test_bad_arguments(setup, tmp_path):
    model, tok = setup
    with pytest.raises(editpack.errors.UnknownMethodError, match="unknown edit method 'nope'"):
        edit(model, FACT, "nope", tokenizer=tok)
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        edit(model, FACT, tokenizer=tok, layer=3)
    with pytest.raises(ValueError, match="outside 0..3"):
        edit(model, FACT, tokenizer=tok, layers=[9], **TINY)
    with pytest.raises(PackFormatError, match="semantic version"):
        edit(model, FACT, tokenizer=tok, version="v1", **TINY)
    with pytest.raises(PackFormatError, match="holds no editpack.json"):
        EditPack.load(tmp_path)


def test_remembered_fingerprints_follow_every_change_to_the_weights(setup, monkeypatch):
    """Hashes are remembered on the model, and a write through ``.data`` (PEFT's merge) or in place is seen."""
    from editpack.model import fingerprint

    model, tok = setup
    hashed = []
    real = fingerprint.weight_fingerprint
    monkeypatch.setattr(fingerprint, "weight_fingerprint", lambda t: hashed.append(1) or real(t))
    names = [n for n, _ in model.named_parameters()][:4]
    first = fingerprint.parameters_fingerprint(model, names)
    assert len(hashed) == 4
    assert fingerprint.parameters_fingerprint(model, names) == first and len(hashed) == 4  # remembered
    param = dict(model.named_parameters())[names[-1]]
    param.data.view(-1)[0] += 1.0  # through .data: no version bump
    changed = fingerprint.parameters_fingerprint(model, names)
    assert changed != first and len(hashed) == 5  # only the changed tensor hashed again
    with torch.no_grad():
        param.view(-1)[0] -= 1.0
    assert fingerprint.parameters_fingerprint(model, names) == first
    # The same weights in another model object are hashed afresh (the memory is per model).
    assert fingerprint.parameters_fingerprint(tiny_model(model.config.model_type), names) == first


def test_merge_then_revert_keeps_pack_fingerprints_right(setup):
    model, tok = setup
    pack = edit(model, FACT, tokenizer=tok, layers=[1], **TINY)
    merged = apply(model, pack, merge=True)  # PEFT writes the merged weights through .data
    second = edit(merged, FACT, tokenizer=tok, layers=[1], **TINY)  # computed on the merged model
    assert second.base.modules == pack.base.modules  # the base (pre-merge) weights' hashes
    restored = revert(merged)
    again = edit(restored, FACT, tokenizer=tok, layers=[1], **TINY)
    assert again.base.modules == pack.base.modules
