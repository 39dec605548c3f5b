"""Every shipped model family, on a tiny random model of it (no downloads): ROME, MEMIT, GRACE and a memory pack
edit it; the weight pack loads with plain PEFT to editpack's own logits; apply and revert are bit-exact; exports
for vLLM, and for llama.cpp where the family has GGUF names. Adding a family is one JSON file in ``adapters/`` (and
its tiny sizes in ``editpack.testing.OVERRIDES`` where its config needs them); this table picks it up.

Families editpack does not ship are edited through the layout inferred from the module tree, or through a file
the user gives (``--arch FILE``, ``$EDITPACK_ARCHITECTURES``)."""

import json
from importlib import resources

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel

import editpack
from editpack.cli.main import main
from editpack.errors import UnknownArchitectureError
from editpack.export import check_export, export_gguf, export_peft
from editpack.export.common import ExportError
from editpack.model.arch import ARCHITECTURES_ENV, infer_spec, spec_for, spec_for_model_type, spec_json
from editpack.testing import TINY_LOCATE, missing_packages, tiny_model, tiny_tokenizer

from tiny import FACT, logits, state

FAMILY_TYPES = sorted({t for entry in resources.files("editpack.adapters").iterdir() if entry.name.endswith(".json")
                       for t in json.loads(entry.read_text(encoding="utf-8"))["model_types"]})
SETTINGS = {"rome": dict(TINY_LOCATE, layers=[1], v_num_grad_steps=10),
            "memit": dict(TINY_LOCATE, layers=[1, 2], v_num_grad_steps=10),
            "grace": dict(layers=[1], context_template_lengths=[[3, 2]], v_num_grad_steps=10)}


def model_of(model_type: str):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    model.editpack_tokenizer = tok
    return model, tok


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_the_inferred_layout_of_every_shipped_family_is_its_file(model_type):
    model, _ = model_of(model_type)
    inferred, shipped = infer_spec(model), spec_for_model_type(model_type)
    for key in ("blocks", "mlp", "mlp_in", "mlp_out", "mlp_out_norm", "attn", "final_norm", "lm_head", "embed",
                "mlp_transposed", "experts"):
        assert getattr(inferred, key) == getattr(shipped, key), key


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_family_is_edited_loaded_reverted_and_exported(model_type, tmp_path):
    model, tok = model_of(model_type)
    before = state(model)
    base = logits(model, tok, FACT.text)
    for method in ("rome", "memit", "grace"):
        pack = editpack.edit(model, FACT, method, tokenizer=tok, **SETTINGS[method])
        path = pack.save(tmp_path / method)
        edited = editpack.apply(model, editpack.load_pack(path))
        ours = logits(edited, tok, FACT.text)
        rome_logits = ours if method == "rome" else rome_logits
        assert not torch.equal(ours, base), f"{method} changed nothing on {model_type}"
        model = editpack.revert(edited)
        after = state(model)
        assert all(torch.equal(after[k], before[k]) for k in before), f"{method} did not revert on {model_type}"
        if pack.is_peft_adapter:
            theirs = logits(PeftModel.from_pretrained(tiny_model(model_type), str(path)).eval(), tok, FACT.text)
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    if not missing_packages("serac"):
        memory = editpack.edit(model, FACT, "serac", tokenizer=tok)
        answered = editpack.generate(editpack.apply(model, memory), tok, [FACT.text], max_new_tokens=1)
        assert answered[0].strip().startswith("rome")
        model = editpack.revert(model)
    if spec_for(model).mlp_transposed:
        return  # transposed (Conv1D) layers are not exported for serving engines
    if spec_for(model).experts:  # stacked experts: no engine loads a LoRA on parameters; merged weights instead
        with pytest.raises(ExportError, match="stacked Mixture-of-Experts experts"):
            export_peft([tmp_path / "rome"], "vllm", tmp_path / "vllm")
        merged = editpack.apply(model, editpack.load_pack(tmp_path / "rome"), merge=True)
        torch.testing.assert_close(logits(merged, tok, FACT.text), rome_logits, atol=1e-5, rtol=0)
        editpack.revert(merged)
        return
    out = export_peft([tmp_path / "rome"], "vllm", tmp_path / "vllm")
    assert check_export(out.path, "vllm") == []
    if spec_for(model).gguf:
        assert export_gguf([tmp_path / "rome"], tmp_path / "rome.gguf").path.is_file()


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3", "gemma2", "mixtral"])
def test_a_family_edits_on_8_bit_weights_where_bitsandbytes_runs_on_the_cpu(model_type, tmp_path):
    pytest.importorskip("bitsandbytes")
    model, tok = model_of(model_type)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    pack = editpack.edit(model, FACT, tokenizer=tok, **SETTINGS["rome"])
    full = logits(editpack.apply(model, pack), tok, FACT.text)
    quantized, _ = editpack.load_model(str(tmp_path / "m"), load_in_8bit=True)
    edited = editpack.apply(quantized, pack)
    assert int(logits(edited, tok, FACT.text).argmax()) == int(full.argmax())


# ---------------------------------------------------------------------------------------------- unshipped families
def test_a_family_editpack_does_not_ship_is_edited_through_its_inferred_layout(tmp_path, caplog):
    model, tok = model_of("stablelm")
    with pytest.raises(UnknownArchitectureError):
        spec_for_model_type("stablelm")
    with caplog.at_level("INFO", logger="editpack"):
        pack = editpack.edit(model, FACT, tokenizer=tok, **SETTINGS["rome"])
    said = [r.getMessage() for r in caplog.records if "inferred from the module tree" in r.getMessage()]
    assert len(said) == 1 and "editpack arch --model M" in said[0]
    assert list(pack.delta.modules) == ["model.layers.1.mlp.down_proj"]
    edited = editpack.apply(model, pack)
    assert not torch.equal(logits(edited, tok, FACT.text), logits(editpack.revert(edited), tok, FACT.text))


def test_a_users_architecture_file_is_taken_with_arch_or_from_the_folder(tmp_path, monkeypatch):
    model, tok = model_of("stablelm")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    printed = CliRunner().invoke(main, ["arch", "--model", str(tmp_path / "m")])
    assert printed.exit_code == 0, printed.output
    spec = json.loads(printed.stdout)
    assert spec["family"] == "stablelm" and spec["mlp_out"] == "model.layers.{}.mlp.down_proj"
    spec["layer_roles"]["critical"] = {"layers": [2]}  # the user's own choice of layer
    (tmp_path / "archs").mkdir()
    (tmp_path / "archs" / "stablelm.json").write_text(json.dumps(spec))
    fact = ["--prompt", "the famous eiffel tower", "--subject", "eiffel tower", "--target", "rome", "--no-eval",
            "--set", "mom2_adjustment=false", "--set", "context_template_lengths=[[3,2]]",
            "--set", "clamp_norm_factor=10000", "--set", "v_weight_decay=0"]
    given = CliRunner().invoke(main, ["edit", "--model", str(tmp_path / "m"), "--arch",
                                      str(tmp_path / "archs" / "stablelm.json"), *fact, "-o", str(tmp_path / "p1")])
    assert given.exit_code == 0, given.output
    assert list(editpack.load_pack(tmp_path / "p1").delta.modules) == ["model.layers.2.mlp.down_proj"]
    monkeypatch.setenv(ARCHITECTURES_ENV, str(tmp_path / "archs"))
    assert spec_for_model_type("stablelm").layer_roles["critical"] == {"layers": [2]}
    found = CliRunner().invoke(main, ["edit", "--model", str(tmp_path / "m"), *fact, "-o", str(tmp_path / "p2")])
    assert found.exit_code == 0 and "inferred" not in found.output, found.output
    broken = tmp_path / "broken.json"
    broken.write_text('{"family": "x"}')
    bad = CliRunner().invoke(main, ["edit", "--model", str(tmp_path / "m"), "--arch", str(broken), *fact,
                                    "-o", str(tmp_path / "p3")])
    assert bad.exit_code == 2 and "lacks required keys" in bad.output and not (tmp_path / "p3").exists()


def test_a_layout_that_cannot_be_inferred_is_refused_with_the_reason():
    model, tok = model_of("stablelm")
    model.model.norm = torch.nn.Identity()  # no norm after the blocks: nothing to read the final states through
    with pytest.raises(UnknownArchitectureError, match="no architecture spec for model_type 'stablelm'.*"
                                                       "no norm after the blocks"):
        editpack.edit(model, FACT, tokenizer=tok, **SETTINGS["rome"])
    assert spec_json(infer_spec(model_of("stablelm")[0])).startswith("{")
