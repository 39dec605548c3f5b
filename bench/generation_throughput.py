"""Generation throughput with packs applied, as ratios to the unedited model measured in the same run.

    python3 -m bench.generation_throughput [--model smollm2-135m] [--packs 10] [--new-tokens 48] [--reps 5]

Configurations: ``base`` (no pack), ``1 unmerged`` (one pack as a PEFT adapter), ``N unmerged`` (N packs
stacked as N separate adapters, all active), ``N merged`` (the N deltas folded into the weights), and
``N as one stacked pack`` (``editpack.stack``: one adapter of rank N). The packs are ROME edits of the first N
CounterFact records. Each configuration generates ``--new-tokens`` greedy tokens (no early stop) for a single
prompt and for a batch of 8; configurations are interleaved ``--reps`` times and the median is kept, so drift
in machine speed hits all of them alike. Prints one JSON object (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import editpack

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PROMPTS = ["The Eiffel Tower is located in the city of", "The capital of Germany is", "Michael Jordan plays the sport of",
           "The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the", "The Louvre is located in",
           "Apple was founded by", "The official language of Brazil is"]


def seconds_per_token(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
        return (time.perf_counter() - start) / new_tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--packs", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--corpus", default=str(DATA / "corpus" / "wikipedia_en_sample.jsonl"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = editpack.load_model(args.model)
    tokenizer.padding_side = "left"
    hparams = {"stats_corpus": args.corpus} if Path(args.corpus).is_file() else {}
    facts = editpack.load_facts(args.data, limit=args.packs)
    start = time.perf_counter()
    packs = [editpack.edit(model, fact, name=f"cf-{i}", **hparams) for i, fact in enumerate(facts)]
    edit_s = time.perf_counter() - start


    configs = {
        "base": (lambda m: m),
        "1 unmerged": (lambda m: editpack.apply(m, packs[0])),
        f"{len(packs)} unmerged": (lambda m: editpack.apply(m, packs)),
        f"{len(packs)} as one stacked pack": (lambda m: editpack.apply(m, editpack.stack(packs))),
        f"{len(packs)} merged": (lambda m: editpack.apply(m, packs, merge=True)),
    }
    times: dict[str, dict[str, list[float]]] = {name: {"batch 1": [], "batch 8": []} for name in configs}
    for _ in range(args.reps):
        for name, put_on in configs.items():
            edited = put_on(model)
            times[name]["batch 1"].append(seconds_per_token(edited, tokenizer, PROMPTS[:1], args.new_tokens))
            times[name]["batch 8"].append(seconds_per_token(edited, tokenizer, PROMPTS, args.new_tokens))
            model = editpack.revert(edited)
    medians = {name: {b: statistics.median(v) for b, v in per.items()} for name, per in times.items()}
    result = {
        "benchmark": "generation_throughput",
        "model": model.editpack_ref.id,
        "torch_threads": torch.get_num_threads(),
        "packs": len(packs),
        "pack_modules": sorted({m for p in packs for m in p.modules}),
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "edit_seconds_total": round(edit_s, 1),
        "ms_per_token": {n: {b: round(1000 * v, 2) for b, v in per.items()} for n, per in medians.items()},
        "ratio_to_base": {n: {b: round(v / medians["base"][b], 3) for b, v in per.items()} for n, per in medians.items()},
        "target": f"{len(packs)} unmerged packs cost < 15 % more time per token than the base",
    }
    worst = max(result["ratio_to_base"][f"{len(packs)} unmerged"].values())
    result["target_met"] = worst < 1.15
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
