"""Batch and sequential editing on CounterFact: MEMIT in one batch, AlphaEdit / FT-M / ROME in rounds.

    python3 -m bench.sequential_editing [--n 200] [--rounds 10] [--memit-n 100] [--methods memit,alphaedit,ft,rome]
                                       [--set KEY=VALUE ...]

- ``memit``: the first ``--memit-n`` records edited in one batch, scored on those records.
- ``alphaedit``, ``ft``, ``rome``: the first ``--n`` records in ``--rounds`` sequential rounds
  (``editpack.extend``: each round is computed on the model with the earlier rounds applied), scored on all
  ``--n`` records after the last round.

``--set`` hyper-parameters go to every method listed. Every result holds the three protocols' before/after
scores (``editpack.evaluation.protocols``), fluency, seconds per fact and per round, and peak memory. The JSON is rewritten after each method (``--out``), so a long run keeps what it has.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import editpack
from editpack.api import extend
from editpack.evaluation.protocols import PROTOCOLS, combine, measure
from editpack.methods.base import parse_settings

from bench._common import checkpoint

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--memit-n", type=int, default=100)
    parser.add_argument("--methods", default="memit,alphaedit,ft,rome")
    parser.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--corpus", default=str(DATA / "corpus" / "wikipedia_en_sample.jsonl"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sequential_editing.json"))
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="A hyper-parameter for every method listed (repeatable).")
    args = parser.parse_args(argv)

    model, tokenizer = editpack.load_model(args.model)
    facts = editpack.load_facts(args.data, limit=args.n, skip_invalid=True)
    stats = {"stats_corpus": args.corpus} if Path(args.corpus).is_file() else {}
    result: dict = {"benchmark": "sequential_editing", "model": model.editpack_ref.id, "data": args.data,
                    "n": len(facts), "rounds": args.rounds, "protocols": list(PROTOCOLS), "methods": {}}

    def save() -> None:
        checkpoint(result, args.out)

    start = time.perf_counter()
    base = measure(model, tokenizer, facts)
    result["seconds_measure_before"] = round(time.perf_counter() - start, 1)

    def scored(pack, subset, base_probes) -> dict:
        edited = editpack.apply(model, pack)
        try:
            return combine(subset, base_probes, measure(edited, tokenizer, subset))
        finally:
            editpack.revert(edited)

    for method in args.methods.split(","):
        hparams = {**(stats if method in ("rome", "memit", "alphaedit") else {}), **parse_settings(args.settings)}
        if method == "memit":
            subset = facts[: args.memit_n]
            t0 = time.perf_counter()
            pack = editpack.edit(model, subset, "memit", name="memit-batch", **hparams)
            seconds = time.perf_counter() - t0
            subset_base = measure(model, tokenizer, subset) if len(subset) != len(facts) else base
            entry = scored(pack, subset, subset_base)
            entry.update({"setting": f"one batch of {len(subset)}", "seconds_per_fact": round(seconds / len(subset), 2),
                          "ranks": sorted({d.rank for d in pack.delta.modules.values()})})
        else:
            size = -(-len(facts) // args.rounds)
            pack, rounds = None, []
            for r in range(args.rounds):
                chunk = facts[r * size : (r + 1) * size]
                if not chunk:
                    break
                t0 = time.perf_counter()
                pack = (editpack.edit(model, chunk, method, name=f"{method}-sequential", **hparams) if pack is None
                        else extend(model, pack, chunk))
                rounds.append(round(time.perf_counter() - t0, 1))
                print(f"{method}: round {r + 1}/{args.rounds} in {rounds[-1]} s", flush=True)
            entry = scored(pack, facts, base)
            entry.update({"setting": f"{len(rounds)} sequential rounds of {size}",
                          "seconds_per_fact": round(sum(rounds) / len(facts), 2), "seconds_per_round": rounds,
                          "version": pack.version,
                          "ranks": sorted({d.rank for d in pack.delta.modules.values()})})
        entry["hyperparameters"] = {k: v for k, v in pack.hyperparameters.items() if k != "context_templates"}
        result["methods"][method] = entry
        save()
        print(json.dumps({method: entry["protocols"]}, indent=1), flush=True)
    save()
    return result


if __name__ == "__main__":
    main()
