"""MEMIT seconds per fact at batch sizes 1, 10 and 100 (one run, ratios to batch size 1 and to a floor).

    python3 -m bench.memit_batch [--sizes 1,10,100] [--singles 3]

Key statistics are computed (or loaded from the cache) by a warm-up edit first, so they are not counted. Batch
size 1 is the mean of ``--singles`` one-fact edits. The floor, measured in the same run, is the bare PyTorch loop
that MEMIT's value optimisation is (``bench._common.delta_loop_floor``: Adam on one δ per fact, the whole model
run over every rewrite prompt, no parameter gradients) for the first ``facts_per_batch`` facts with the steps and
learning rate of the largest batch's pack, per fact; everything else MEMIT does comes on top of it. Prints one
JSON object (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import editpack
from bench._common import DATA, REPO, delta_loop_floor, emit, in_dtype
from editpack.methods.locate.values import rewrite_lookups
from editpack.model.arch import spec_for


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument("--singles", type=int, default=3)
    parser.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--corpus", default=str(DATA / "corpus" / "wikipedia_en_sample.jsonl"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "memit_batch.json"))
    args = parser.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",")]
    model, tokenizer = editpack.load_model(args.model)
    facts = editpack.load_facts(args.data, limit=max(sizes) + args.singles, skip_invalid=True)
    hparams = {"stats_corpus": args.corpus} if Path(args.corpus).is_file() else {}
    editpack.edit(model, facts[-1], "memit", **hparams)  # warm-up: statistics, context templates
    per_fact = {}
    for size in sizes:
        runs = [facts[i : i + 1] for i in range(args.singles)] if size == 1 else [facts[:size]]
        start = time.perf_counter()
        for batch in runs:
            pack = editpack.edit(model, batch, "memit", **hparams)
        per_fact[size] = (time.perf_counter() - start) / sum(len(b) for b in runs)
        print(f"batch {size}: {per_fact[size]:.2f} s/fact", flush=True)
    hp = pack.hyperparameters
    chunk = facts[: min(max(sizes), hp["facts_per_batch"])]
    module = spec_for(model).mlp_out_name(hp["layers"][-1])
    prompts = [rewrite_lookups(tokenizer, fact, hp["context_templates"]) for fact in chunk]
    floor = delta_loop_floor(in_dtype(model, hp["optimize_dtype"]), tokenizer, module, prompts,
                             hp["v_num_grad_steps"], hp["v_lr"]) / len(chunk)
    print(f"floor (bare δ loop, {len(chunk)} facts, {hp['v_num_grad_steps']} steps): {floor:.2f} s/fact", flush=True)
    result = {
        "benchmark": "memit_batch", "model": model.editpack_ref.id,
        "seconds_per_fact": {str(k): round(v, 3) for k, v in per_fact.items()},
        "ratio_to_batch_1": {str(k): round(v / per_fact[sizes[0]], 3) for k, v in per_fact.items()},
        "floor_seconds_per_fact": round(floor, 3),
        "ratio_to_floor": {str(k): round(v / floor, 3) for k, v in per_fact.items()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
