"""Seconds to evaluate a new one-fact pack for its card: with the unedited model's suites measured afresh, and read
from the cache a first card leaves (the base model's side is then not measured again).

    python3 -m bench.card_eval [--model smollm2-135m] [--repeat 2]

Both timings are of ``editpack.evaluate_pack`` on ROME packs of the same model (statistics from the shipped
Wikipedia slice, computed before the clock starts), in a private ``EDITPACK_HOME``; ``ratio`` is warm over cold.
"""

from __future__ import annotations

import argparse
import statistics
import time

import editpack
from bench._common import REPO, emit, private_home

FACTS = [("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"),
         ("The Colosseum is located in the city of", "Colosseum", "London"),
         ("The Louvre is located in the city of", "Louvre", "Berlin")]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeat", type=int, default=2, help="warm evaluations (each of another pack)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "card_eval.json"))
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1 (the later cards are what is timed against the first)")
    corpus = str(REPO / "tests" / "data" / "wikipedia-slice.jsonl")
    with private_home():
        model, tokenizer = editpack.load_model(args.model)
        packs = [editpack.edit(model, editpack.make_fact(p, s, t), stats_corpus=corpus)
                 for p, s, t in FACTS[: 1 + args.repeat]]
        timings = []
        for pack in packs:
            start = time.perf_counter()
            editpack.evaluate_pack(model, tokenizer, pack)
            timings.append(time.perf_counter() - start)
            print(f"{pack.name}: {timings[-1]:.1f} s", flush=True)
    cold, warm = timings[0], statistics.median(timings[1:])
    return emit({"benchmark": "card_eval", "model": model.editpack_ref.id, "seconds_cold": round(cold, 2),
                 "seconds_warm": round(warm, 2), "ratio_warm_to_cold": round(warm / cold, 3),
                 "seconds_each": [round(t, 2) for t in timings]}, args.out)


if __name__ == "__main__":
    main()
