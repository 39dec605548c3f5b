"""Memory packs on CounterFact: generate_match scores and the latency they add, in and out of scope.

    python3 -m bench.memory_pack [--n 100] [--route context|answer|both] [--reps 3]

Builds one memory pack from the first ``--n`` records of counterfact-edit.json, scores it under the
``generate_match`` protocol (reliability on the edit prompts, generalization on the paraphrases, locality on the
neighbourhood prompts), and times greedy answers (8 new tokens, batch 1) for in-scope prompts (the edit prompts)
and out-of-scope prompts (neighbourhood prompts) with the memory against the bare model, as ratios measured in
the same run. Prints one JSON object (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import editpack
from editpack.evaluation.report import evaluate_pack

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def seconds_per_answer(model, tokenizer, prompts, reps: int) -> float:
    times = []
    for _ in range(reps):
        for prompt in prompts:
            start = time.perf_counter()
            editpack.generate(model, tokenizer, [prompt], max_new_tokens=8)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--route", default="both", choices=["context", "answer", "both"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timed", type=int, default=10, help="prompts of each kind to time")
    parser.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "memory_pack.json"))
    args = parser.parse_args(argv)

    model, tokenizer = editpack.load_model(args.model)
    facts = editpack.load_facts(args.data, limit=args.n, skip_invalid=True)
    result: dict = {"benchmark": "memory_pack", "model": model.editpack_ref.id, "data": args.data, "n": len(facts),
                    "routes": {}}
    for route in (["context", "answer"] if args.route == "both" else [args.route]):
        start = time.perf_counter()
        memory = editpack.edit(model, facts, "serac", route=route)
        build_s = time.perf_counter() - start
        scores = evaluate_pack(model, tokenizer, memory, protocols=["generate_match"])
        inside = [f.text for f in facts[: args.timed]]
        outside = [p.prompt for f in facts[: args.timed] for p in f.neighborhood[:1]]
        base_in = seconds_per_answer(model, tokenizer, inside, args.reps)
        base_out = seconds_per_answer(model, tokenizer, outside, args.reps)
        edited = editpack.apply(model, memory)
        try:
            mem_in = seconds_per_answer(edited, tokenizer, inside, args.reps)
            mem_out = seconds_per_answer(edited, tokenizer, outside, args.reps)
        finally:
            model = editpack.revert(edited)
        result["routes"][route] = {
            "threshold": memory.threshold,
            "build_seconds": round(build_s, 2),
            "generate_match": scores["protocols"]["generate_match"],
            "fluency": scores.get("fluency"),
            "seconds_per_answer": {"base in-scope prompts": round(base_in, 4), "memory in scope": round(mem_in, 4),
                                   "base out-of-scope prompts": round(base_out, 4),
                                   "memory out of scope": round(mem_out, 4)},
            "latency_ratio": {"in scope": round(mem_in / base_in, 3), "out of scope": round(mem_out / base_out, 3)},
        }
        print(json.dumps({route: result["routes"][route]}, indent=1), flush=True)
    text = json.dumps(result, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
