"""ROME speed and efficacy on CounterFact, one record at a time (model restored between edits).

    python3 -m bench.rome_speed [--model smollm2-135m] [--limit 20] [--data PATH] [--corpus PATH] [--set k=v]

Prints one JSON object: seconds per edit (key statistics cached by a warm-up edit first, so they are not
counted) beside two references measured in the same run for each edit: the floor (the bare δ loop of
``bench/_common.py``: the same prompts, the same number of Adam steps the edit took, the same precision, plain
PyTorch over the whole prompts) and the seconds editpack's own δ loop took inside the edit (so
``seconds_per_edit / delta_loop_seconds`` is what an edit costs beyond its optimisation), peak resident memory, how many records end with the new target as the top-1 next token, on the edit
prompt and on its paraphrases, and how many neighbourhood prompts keep their top-1 token. (The full metrics,
under named protocols, are the evaluation engine's job; these are the quick first-token checks.)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from bench._common import DATA, StepCounter, delta_loop_floor, emit, in_dtype  # noqa: E402

import editpack  # noqa: E402
from editpack.model.arch import spec_for  # noqa: E402
from editpack.model.generation import next_token_logits  # noqa: E402
from editpack.methods.base import parse_settings  # noqa: E402
from editpack.methods.locate.values import rewrite_lookups  # noqa: E402


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
    warm_pack = editpack.edit(model, facts[0], **hparams)  # computes (or loads) key statistics, context templates
    warmup_s = time.perf_counter() - warm

    floor_model = in_dtype(model, pack_dtype := warm_pack.hyperparameters["optimize_dtype"])
    spec = spec_for(model)
    seconds, floors, loops, hits, para_hits, para_n, kept, kept_n, rows = [], [], [], 0, 0, 0, 0, 0, []
    for fact in facts:
        with StepCounter() as counter:
            start = time.perf_counter()
            pack = editpack.edit(model, fact, **hparams)
            seconds.append(time.perf_counter() - start)
        loops.append(counter.seconds)
        hp = pack.hyperparameters
        module = spec.mlp_out_name(hp["layers"][0])
        prompts = rewrite_lookups(tokenizer, fact, hp["context_templates"])
        floors.append(delta_loop_floor(floor_model, tokenizer, module, [prompts], counter.steps[0], hp["v_lr"]))
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
                     "hit": top == target, "seconds": round(seconds[-1], 3), "floor_seconds": round(floors[-1], 3),
                     "delta_loop_seconds": round(loops[-1], 3),
                     "steps": counter.steps[0]})
    result = {
        "benchmark": "rome_speed",
        "model": model.editpack_ref.id,
        "records": len(facts),
        "hyperparameters": {k: v for k, v in pack.hyperparameters.items() if k != "context_templates"},
        "warmup_seconds_incl_stats": round(warmup_s, 2),
        "seconds_per_edit_mean": round(statistics.mean(seconds), 3),
        "seconds_per_edit_median": round(statistics.median(seconds), 3),
        "floor_seconds_per_edit_mean": round(statistics.mean(floors), 3),
        "ratio_to_floor": round(statistics.mean(seconds) / statistics.mean(floors), 3),
        "floor": f"bare δ loop in {pack_dtype}: same prompts and Adam steps, NLL only, whole prompts each step",
        "delta_loop_seconds_per_edit_mean": round(statistics.mean(loops), 3),
        "ratio_to_own_delta_loop": round(statistics.mean(seconds) / statistics.mean(loops), 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "top1_new_target": hits,
        "paraphrase_top1_new_target": f"{para_hits}/{para_n}",
        "neighborhood_top1_unchanged": f"{kept}/{kept_n}",
        "torch_threads": torch.get_num_threads(),
        "per_record": rows,
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
