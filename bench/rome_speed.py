"""ROME speed and efficacy on CounterFact, one record at a time (model restored between edits).

    python bench/rome_speed.py [--model smollm2-135m] [--limit 20] [--data PATH] [--corpus PATH] [--set k=v]

Prints one JSON object: seconds per edit (key statistics cached by a warm-up edit first, so they are not
counted), peak resident memory, how many records end with the new target as the top-1 next token, on the edit
prompt and on its paraphrases, and how many neighbourhood prompts keep their top-1 token. (The full metrics,
under named protocols, are the evaluation engine's job; these are the quick first-token checks.)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import editpack
from editpack.generation import next_token_logits
from editpack.methods.base import parse_settings

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--corpus", default=str(DATA / "corpus" / "wikipedia_en_sample.jsonl"))
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="Also write the JSON here.")
    args = parser.parse_args(argv)

    hparams = parse_settings(args.settings)
    if args.corpus and Path(args.corpus).is_file():
        hparams.setdefault("stats_corpus", args.corpus)

    model, tokenizer = editpack.load_model(args.model)
    facts = editpack.load_facts(args.data, limit=args.limit)
    warm = time.perf_counter()
    editpack.edit(model, facts[0], **hparams)  # computes (or loads) key statistics and context templates
    warmup_s = time.perf_counter() - warm

    seconds, hits, para_hits, para_n, kept, kept_n, rows = [], 0, 0, 0, 0, 0, []
    for fact in facts:
        start = time.perf_counter()
        pack = editpack.edit(model, fact, **hparams)
        seconds.append(time.perf_counter() - start)
        target = tokenizer(" " + fact.target_new, add_special_tokens=False)["input_ids"][0]
        probes = [fact.text, *fact.paraphrases, *(p.prompt for p in fact.neighborhood)]
        before = next_token_logits(model, tokenizer, probes).argmax(-1)
        edited = editpack.apply(model, pack)
        after = next_token_logits(edited, tokenizer, probes).argmax(-1)
        model = editpack.revert(edited)
        top = int(after[0])
        n_para = len(fact.paraphrases)
        hits += int(top == target)
        para_hits += int((after[1 : 1 + n_para] == target).sum())
        para_n += n_para
        kept += int((after[1 + n_para :] == before[1 + n_para :]).sum())
        kept_n += len(fact.neighborhood)
        rows.append({"id": fact.id, "target_new": fact.target_new, "top1": tokenizer.decode([top]),
                     "hit": top == target, "seconds": round(seconds[-1], 3)})
    result = {
        "benchmark": "rome_speed",
        "model": model.editpack_ref.id,
        "records": len(facts),
        "hyperparameters": {k: v for k, v in pack.hyperparameters.items() if k != "context_templates"},
        "warmup_seconds_incl_stats": round(warmup_s, 2),
        "seconds_per_edit_mean": round(statistics.mean(seconds), 3),
        "seconds_per_edit_median": round(statistics.median(seconds), 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "top1_new_target": hits,
        "paraphrase_top1_new_target": f"{para_hits}/{para_n}",
        "neighborhood_top1_unchanged": f"{kept}/{kept_n}",
        "torch_threads": torch.get_num_threads(),
        "per_record": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
