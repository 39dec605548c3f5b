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
from importlib import resources
from pathlib import Path

import torch

import editpack
import editpack.console
from editpack.export import check_export, engines, export_gguf, export_peft
from editpack.methods import REGISTRY
from editpack.testing import missing_packages, tiny_edit_settings, tiny_facts, tiny_model, tiny_tokenizer


def main() -> int:
    source = Path(editpack.__file__).resolve()
    if "site-packages" not in source.parts:
        print(f"FAIL: editpack imported from {source}, not from an installed package")
        return 1
    print(f"editpack {editpack.__version__} from {source.parent}")
    editpack.console.configure()  # the libraries' warnings, as a normal command hides them
    tok = tiny_tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        for method in sorted(REGISTRY):  # every registered method, with the tiny settings it declares
            missing = missing_packages(method)
            if missing:
                print(f"skip {method}: {', '.join(missing)} is not installed")
                continue
            settings = tiny_edit_settings(method, scratch, tokenizer=tok)
            if REGISTRY[method].trainable:
                print(f"ok train: {method} editor for the tiny model")
            facts = tiny_facts(REGISTRY[method].tiny_fact_count)
            model = tiny_model("llama")
            model.editpack_tokenizer = tok
            before = {k: v.clone() for k, v in model.state_dict().items()}
            pack = editpack.edit(model, facts, method, **settings)
            if method == "rome":  # the shipped suites and the chart, as `editpack edit` evaluates a new pack
                pack.evaluation = editpack.evaluate_pack(model, tok, pack)
            path = pack.save(Path(scratch) / method)
            if method == "rome" and "evaluation.png" not in pack.files:
                print("FAIL: rome: the evaluated pack has no chart")
                return 1
            loaded = editpack.load_pack(path)
            edited = editpack.apply(model, loaded)
            editpack.generate(edited, tok, [facts[0].text], max_new_tokens=2)
            plain = editpack.revert(edited)
            same = all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
            if not same:
                print(f"FAIL: {method}: revert did not restore the weights")
                return 1
            print(f"ok {method}: {loaded.kind} pack {loaded.ref}, {sorted(p.name for p in path.iterdir())}")
        # Package data of the export rules and the playground page, and an export of the ROME pack for each.
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
        # A Mixture-of-Experts family from the wheel's architecture files: a ROME pack on its stacked experts.
        model = tiny_model("mixtral")
        model.editpack_tokenizer = tok
        pack = editpack.edit(model, tiny_facts(1), "rome", **tiny_edit_settings("rome", scratch, tokenizer=tok))
        loaded = editpack.load_pack(pack.save(Path(scratch) / "moe"))
        if loaded.stacked_modules != ["model.layers.1.mlp.experts.down_proj"]:
            print(f"FAIL: mixtral: the pack edits {loaded.modules}, not the stacked experts")
            return 1
        editpack.revert(editpack.apply(model, loaded))
        print("ok mixtral: rome on the stacked experts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
