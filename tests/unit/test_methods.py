"""MEMIT, AlphaEdit, FT-M and LoRA on tiny random models; sequential editing with extend()."""

import pytest
import torch
from peft import PeftModel

import editpack
from editpack import apply, edit, extend, revert
from editpack.methods.alphaedit.method import AlphaEdit, null_space_projector
from editpack.packs.manifest import MANIFEST
from editpack.packs.weights import STATE

from tiny import FACT, logits, state, tiny_model, tiny_tokenizer

SECOND = editpack.make_fact("the old {}", "london bridge", "tokyo", "london")
THIRD = editpack.make_fact("the red {}", "river", "madrid", "paris")
LOCATE = dict(mom2_adjustment=False, context_template_lengths=[[3, 2]], clamp_norm_factor=1e4, v_weight_decay=0.0,
              v_num_grad_steps=40)
SETTINGS = {
    "memit": dict(LOCATE, layers=[1, 2], mom2_update_weight=0.1),
    "alphaedit": dict(LOCATE, layers=[1, 2], l2=0.1),
    "ft": dict(layers=[2], lr=2e-2, num_steps=60),
    "lora": dict(layers=[1, 2], lr=2e-2, num_steps=80),
}


@pytest.fixture(params=["llama", "gpt2"])
def setup(request):
    return tiny_model(request.param), tiny_tokenizer()


def top1(model, tok, fact):
    return tok.decode(logits(model, tok, fact.text).argmax())


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_each_method_edits_two_facts_and_leaves_the_model_alone(setup, method, tmp_path):
    model, tok = setup
    before = state(model)
    pack = edit(model, [FACT, SECOND], method, tokenizer=tok, **SETTINGS[method])
    after = state(model)
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before), method
    assert not isinstance(model, PeftModel) and not any("lora" in k for k in after)
    edited = apply(model, pack)
    assert [top1(edited, tok, f) for f in (FACT, SECOND)] == ["rome", "tokyo"], method
    expected = logits(edited, tok, FACT.text)
    model = revert(edited)
    pack.save(tmp_path / "p")
    manifest = editpack.packs.manifest.read_manifest(tmp_path / "p")
    forms = {m["form"] for m in manifest["delta"]["modules"].values()}
    assert forms == ({"dense"} if method == "ft" else {"lora"}), forms  # FT-M's delta is a dense matrix
    reloaded = PeftModel.from_pretrained(model, str(tmp_path / "p"))  # any form is a plain PEFT adapter
    torch.testing.assert_close(logits(reloaded, tok, FACT.text), expected, rtol=1e-5, atol=1e-5)
    reloaded.unload()


def test_memit_rank_is_the_number_of_facts_per_layer(setup):
    model, tok = setup
    pack = edit(model, [FACT, SECOND, THIRD], "memit", tokenizer=tok, **SETTINGS["memit"])
    assert sorted(pack.modules) == sorted(editpack.spec_for(model).mlp_out_name(i) for i in (1, 2))
    assert all(d.rank == 3 for d in pack.delta.modules.values())
    assert pack.hyperparameters["layers"] == [1, 2] and pack.hyperparameters["context_templates"]


def test_dense_form_round_trips_exactly(setup, tmp_path):
    model, tok = setup
    pack = edit(model, FACT, "ft", tokenizer=tok, **SETTINGS["ft"])
    (module,) = pack.modules
    pack.save(tmp_path / "p")
    loaded = editpack.EditPack.load(tmp_path / "p")
    assert torch.equal(loaded.delta.modules[module].dense(), pack.delta.modules[module].dense())
    assert loaded.content_id == pack.content_id


def test_null_space_projector_keeps_updates_off_preserved_keys():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(16, 16))
    values = torch.cat([torch.full((10,), 5.0), torch.full((6,), 1e-4)])  # 10 used directions, 6 unused
    mom2 = basis @ torch.diag(values) @ basis.T
    projector = null_space_projector(mom2, threshold=1e-2)
    assert torch.allclose(projector @ basis[:, :10], torch.zeros(16, 10), atol=1e-5)
    assert torch.allclose(projector @ basis[:, 10:], basis[:, 10:], atol=1e-5)
    method = AlphaEdit(AlphaEdit.config_class(l2=1e-3, nullspace_threshold=1e-2))
    keys = torch.randn(3, 16)
    a = method.update_factor(keys, mom2, "m", None)
    update = torch.randn(8, 3) @ a  # ΔW for any residual
    preserved = update @ basis[:, :10]
    assert preserved.norm() < 1e-3 * update.norm()  # outputs on preserved keys do not move
    with pytest.raises(ValueError, match="no eigenvalue .* below nullspace_threshold"):
        null_space_projector(mom2, threshold=1e-6)


def test_alphaedit_sequential_rounds_keep_state_and_lineage(setup, tmp_path):
    model, tok = setup
    first = edit(model, [FACT], "alphaedit", tokenizer=tok, name="seq", **SETTINGS["alphaedit"])
    module = editpack.spec_for(model).mlp_out_name(1)
    assert first.delta.state[f"keys.{module}"].shape[0] == 1
    first.save(tmp_path / "v1")
    assert (tmp_path / "v1" / STATE).is_file()
    loaded = editpack.EditPack.load(tmp_path / "v1")
    assert torch.equal(loaded.delta.state[f"keys.{module}"], first.delta.state[f"keys.{module}"])

    second = extend(model, tmp_path / "v1", [SECOND], tokenizer=tok)
    assert second.name == "seq" and second.version == "1.1.0" and second.method == "alphaedit"
    assert second.delta.state[f"keys.{module}"].shape[0] == 2
    assert second.parents == [loaded.lineage_record("extends")] and not second.requires
    assert [f.subject for f in second.facts] == ["eiffel tower", "london bridge"]
    assert all(d.rank == 2 for d in second.delta.modules.values())  # both rounds' factors
    assert not editpack.applied(model)
    edited = apply(model, second)  # applies to the base model on its own
    assert [top1(edited, tok, f) for f in (FACT, SECOND)] == ["rome", "tokyo"]
    revert(edited)
    second.save(tmp_path / "v2")
    manifest = editpack.packs.manifest.read_manifest(tmp_path / "v2")
    assert manifest["parents"][0]["relation"] == "extends" and STATE in manifest["files"]


def test_extend_replaces_a_corrected_fact(setup):
    model, tok = setup
    first = edit(model, [FACT, SECOND], "memit", tokenizer=tok, name="fix", **SETTINGS["memit"])
    corrected = editpack.make_fact(FACT.prompt, FACT.subject, "berlin", "paris")
    nxt = extend(model, first, [corrected], tokenizer=tok)
    assert [(f.subject, f.target_new) for f in nxt.facts] == [("london bridge", "tokyo"), ("eiffel tower", "berlin")]
    edited = apply(model, nxt)
    assert [top1(edited, tok, f) for f in (FACT, SECOND)] == ["berlin", "tokyo"]
    revert(edited)


def test_lora_refuses_a_model_with_unmerged_packs(setup):
    model, tok = setup
    pack = edit(model, FACT, "memit", tokenizer=tok, **SETTINGS["memit"])
    edited = apply(model, pack)
    with pytest.raises(editpack.EditpackError, match="merge=True"):
        edit(edited, SECOND, "lora", tokenizer=tok, **SETTINGS["lora"])
    revert(edited)


def test_manifest_names_the_state_file(setup, tmp_path):
    model, tok = setup
    edit(model, FACT, "alphaedit", tokenizer=tok, **SETTINGS["alphaedit"]).save(tmp_path / "p")
    manifest = editpack.packs.manifest.read_manifest(tmp_path / "p")
    assert manifest["delta"]["state"] and (tmp_path / "p" / MANIFEST).is_file()


def test_a_delta_of_higher_rank_than_dense_applies_in_dense_form(setup):
    model, tok = setup
    pack = edit(model, FACT, "ft", tokenizer=tok, **SETTINGS["ft"])
    (module,) = pack.modules
    twice = editpack.stack([pack, edit(model, SECOND, "ft", tokenizer=tok, name="other", **SETTINGS["ft"])])
    assert twice.delta.modules[module].rank > min(twice.delta.modules[module].B.shape[0],
                                                   twice.delta.modules[module].A.shape[1])
    edited = apply(model, twice)  # stored and applied as the dense sum
    assert [top1(edited, tok, f) for f in (FACT, SECOND)] == ["rome", "tokyo"]
    revert(edited)


def test_settings_parse_json_values_and_reject_malformed_items():
    from editpack.methods.base import parse_settings

    assert parse_settings(["layers=[3, 4]", "v_lr=0.5", "optimize_dtype=bfloat16", "mom2_adjustment=false"]) == {
        "layers": [3, 4], "v_lr": 0.5, "optimize_dtype": "bfloat16", "mom2_adjustment": False}
    for bad in ["v_lr", "=3"]:
        with pytest.raises(ValueError, match="is not KEY=VALUE"):
            parse_settings([bad])


def test_experimental_methods_say_so_in_help_on_the_command_line_and_in_their_card(tiny_dir, tmp_path):
    """WISE and UltraEdit barely edit on the built-ins: --help gives the measured reason, `edit` warns, and the
    pack records it as a note its card shows; other methods' packs carry no note (and their cards are as before)."""
    from click.testing import CliRunner

    from editpack.cli.main import main
    from editpack.methods import REGISTRY

    assert {m for m, c in REGISTRY.items() if c.experimental} == {"wise", "ultraedit"}
    shown = " ".join(CliRunner().invoke(main, ["edit", "--help"]).output.split())
    assert "(experimental: after 1,000 edits on SmolLM2 the new answer beat the old one for 38 %" in shown
    result = CliRunner().invoke(main, ["edit", "--model", str(tiny_dir), "--method", "wise", "--prompt",
                                       "the famous eiffel tower", "--subject", "eiffel tower", "--target", "rome",
                                       "--layers", "2", "--set", "n_iter=10", "--no-eval", "-o", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    assert "Warning: wise is experimental: after 1,000 edits" in result.stderr
    pack = editpack.load_pack(tmp_path / "w")
    assert pack.notes == [f"wise is experimental: {REGISTRY['wise'].experimental}"]
    assert "> **Note:** wise is experimental" in (tmp_path / "w" / "README.md").read_text()
    plain = edit(tiny_model("llama"), FACT, tokenizer=tiny_tokenizer(), layers=[1], mom2_adjustment=False)
    assert plain.notes == [] and "notes" not in plain.manifest()
