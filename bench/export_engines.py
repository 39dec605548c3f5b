"""A stack of ROME edits exported for every serving engine and as GGUF: ranks, sizes, conformance, logits.

    python3 -m bench.export_engines [--model smollm2-135m] [--edits 10] [--data FILE] [--corpus FILE] [--out FILE]

Edits the first ``--edits`` CounterFact records one pack each (ROME), stacks them into one pack
(``editpack.stack``), and exports that pack for vLLM, SGLang, LoRAX and TGI (PEFT folders) and as a llama.cpp
GGUF adapter (names and shapes checked against the built-in's GGUF). For each engine: rank, modules, bytes, the
engine-rule check, and the largest logit difference between the export loaded by plain PEFT and the pack applied
by editpack. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from bench._common import REPO, emit  # noqa: E402

import editpack  # noqa: E402
from editpack.export.engines import check_export, engines, export_peft  # noqa: E402
from editpack.export.gguf import export_gguf


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--data", default=str(REPO / "tests" / "data" / "counterfact-edit-25.json"))
    parser.add_argument("--corpus", default=str(REPO / "tests" / "data" / "wikipedia-slice.jsonl"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from peft import PeftModel

    from editpack.model.builtins import BUILTINS

    model, tokenizer = editpack.load_model(args.model)
    facts = editpack.load_facts(args.data, limit=args.edits, skip_invalid=True)
    packs = [editpack.edit(model, fact, stats_corpus=args.corpus, name=f"cf-{fact.id}") for fact in facts]
    stacked = editpack.stack(packs, name=f"rome-stack-{len(packs)}")
    ids = tokenizer([f.text for f in facts], return_tensors="pt", padding=True)
    edited = editpack.apply(model, stacked)
    with torch.no_grad():
        want = edited(**ids).logits
    model = editpack.revert(edited)
    depth = len(model.model.layers)
    result: dict = {"benchmark": "export_engines", "model": model.editpack_ref.id, "edits": len(packs),
                    "stacked_pack": {"modules": stacked.modules,
                                     "ranks": {m: d.rank for m, d in stacked.delta.modules.items()}},
                    "engines": {}}
    with tempfile.TemporaryDirectory() as folder:
        pack_dir = stacked.save(Path(folder) / "stacked")
        result["stacked_pack"]["bytes"] = sum(f.stat().st_size for f in pack_dir.iterdir() if f.is_file())
        for engine in engines():
            out = export_peft([pack_dir], engine, Path(folder) / engine)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model = PeftModel.from_pretrained(model, str(out.path))
            with torch.no_grad():
                got = peft_model(**ids).logits
            model = peft_model.unload()
            result["engines"][engine] = {
                "rank": out.rank, "modules": len(out.modules), "bytes": out.bytes,
                "rule_problems": check_export(out.path, engine, num_layers=depth),
                "max_abs_logit_difference": float((got - want).abs().max()), "notes": out.notes,
            }
        builtin = BUILTINS.get(model.editpack_ref.id)
        base = builtin.locate(builtin, Path(folder)) if builtin is not None and builtin.locate.__name__ == \
            "_gguf_in_package" else None
        gguf_out = export_gguf([pack_dir], Path(folder) / "stack.gguf", base=base)
        result["engines"]["gguf"] = {"rank": gguf_out.rank, "modules": len(gguf_out.modules), "bytes": gguf_out.bytes,
                                     "checked_against": base.name if base else None, "notes": gguf_out.notes}
    return emit(result, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
