"""How many key-statistics tokens are enough: ROME (each record on its own) and MEMIT (one batch) on the same
records against the number of tokens the statistics are computed from, and the count the stopping rule picks.

    python3 -m bench.stats_tokens [--tokens 10000,30000,100000,300000,1000000] [--n 50] [--methods rome,memit]
    python3 -m bench.stats_tokens --small        # its own code path on a tiny model

A run picks up where one with the same model, records, corpus and ``--out`` stopped: rows already there are kept
and not measured again (so methods and counts can be added run by run).

Every count's statistics come from the same corpus (default: the 20 MB Wikipedia sample beside the repository,
else the shipped slice), computed by ``editpack.api.compute_stats`` for the method's layers; the edits are scored
under prob_compare and generate_match (efficacy, paraphrase, neighbourhood). ``--tokens auto`` runs the stopping
rule as well and reports the count it read. ``default`` is the smallest count none of whose scores (efficacy,
paraphrase and neighbourhood under both protocols) falls more than one point below the largest count's, for every
method.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import editpack
from bench._common import DATA, REPO, checkpoint
from editpack.api import compute_stats
from editpack.evaluation.protocols import bench_edits, combine, measure

METRICS = ("reliability", "generalization", "locality")


def scores(result: dict) -> dict:
    return {protocol: {m: result["protocols"][protocol][m]["after"] for m in METRICS}
            for protocol in ("prob_compare", "generate_match")}


def run(model, tokenizer, facts, method: str, tokens, corpus: str, settings: dict) -> dict:
    start = time.perf_counter()
    stats = compute_stats(model, method, corpus=corpus, tokens=tokens, tokenizer=tokenizer, **settings.get("stats", {}))
    stats_seconds = time.perf_counter() - start
    hparams = {**settings.get("edit", {}), "stats_corpus": corpus, "stats_tokens": stats.provenance["n_tokens"]}
    if tokens == "auto":
        hparams["stats_tolerance"] = stats.provenance["rule"]["tolerance"]
    # Fluency and the same-subject prompts are not among the scores: not generated.
    if method == "memit":
        base = measure(model, tokenizer, facts, fluency_tokens=0, same_subject=0)
        pack = editpack.edit(model, facts, method, tokenizer=tokenizer, **hparams)
        edited = editpack.apply(model, pack)
        try:
            result = combine(facts, base, measure(edited, tokenizer, facts, fluency_tokens=0, same_subject=0))
        finally:
            editpack.revert(edited)
    else:
        result = bench_edits(model, tokenizer, facts,
                             lambda f: editpack.edit(model, f, method, tokenizer=tokenizer, **hparams),
                             fluency_tokens=0, same_subject=0)
    return {"tokens": tokens, "tokens_read": stats.provenance["tokens"], "stats_seconds": round(stats_seconds, 1),
            "stopped": stats.provenance["stopped"], "scores": scores(result)}


def default_count(rows: list[dict]) -> int | None:
    """The smallest fixed count no score of which (both protocols, every metric) falls more than one point below
    the largest count's, for every method. A smaller count that scores higher is not held against it."""
    fixed = [r for r in rows if r["tokens"] != "auto"]
    if not fixed:
        return None
    by_method: dict[str, list[dict]] = {}
    for row in fixed:
        by_method.setdefault(row["method"], []).append(row)
    candidates = sorted({r["tokens"] for r in fixed})
    for count in candidates:
        ok = True
        for method_rows in by_method.values():
            largest = max(method_rows, key=lambda r: r["tokens"])["scores"]
            row = next((r for r in method_rows if r["tokens"] == count), None)
            if row is None or any(row["scores"][p][m] < largest[p][m] - 0.01 for p in largest for m in METRICS):
                ok = False
        if ok:
            return count
    return candidates[-1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=f"counterfact:{DATA / 'counterfact' / 'counterfact-edit.json'}")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--methods", default="rome,memit")
    parser.add_argument("--tokens", default="10000,30000,100000,300000,1000000,auto")
    parser.add_argument("--corpus", default=str(DATA / "corpus" / "wikipedia_en_sample.jsonl"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "stats_tokens.json"))
    parser.add_argument("--small", action="store_true", help="a tiny model, 3 shipped records, small counts")
    args = parser.parse_args(argv)
    settings: dict = {}
    if args.small:
        from editpack.testing import TINY_LOCATE, tiny_model, tiny_tokenizer

        model, tokenizer = tiny_model(), tiny_tokenizer()
        model.editpack_tokenizer = tokenizer
        args.data, args.n = f"counterfact:{REPO / 'tests' / 'data' / 'counterfact-edit-25.json'}", 3
        args.tokens = "300,600,auto" if args.tokens == parser.get_default("tokens") else args.tokens
        args.corpus = str(REPO / "tests" / "data" / "wikipedia-slice.jsonl")
        tiny = {k: v for k, v in TINY_LOCATE.items() if k != "mom2_adjustment"}
        settings = {"edit": tiny, "stats": {"layers": [1]}}
        settings["edit"]["layers"] = [1]
    else:
        model, tokenizer = editpack.load_model(args.model)
        if not Path(args.corpus).is_file():
            args.corpus = str(REPO / "tests" / "data" / "wikipedia-slice.jsonl")
    facts = editpack.load_facts(args.data, limit=args.n, skip_invalid=True)
    counts = [t if t == "auto" else int(t) for t in args.tokens.split(",")]
    result = {"benchmark": "stats_tokens", "model": getattr(getattr(model, "editpack_ref", None), "id", "tiny"),
              "data": args.data.split(":", 1)[-1].rsplit("/", 1)[-1], "n": len(facts),
              "corpus": Path(args.corpus).name, "rows": []}
    result["rows"] = earlier_rows(args.out, result)
    for method in args.methods.split(","):
        for count in counts:
            if any(r["method"] == method and r["tokens"] == count for r in result["rows"]):
                continue
            row = {"method": method, **run(model, tokenizer, facts, method, count, args.corpus, settings)}
            result["rows"].append(row)
            pc = row["scores"]["prob_compare"]
            print(f"{method} {count} ({row['tokens_read']:,} read, {row['stats_seconds']} s): prob_compare "
                  f"{100 * pc['reliability']:.0f} / {100 * pc['generalization']:.0f} / {100 * pc['locality']:.0f}",
                  flush=True)
            result["default"] = default_count(result["rows"])
            checkpoint(result, args.out)
    return result


def earlier_rows(out: str, result: dict) -> list[dict]:
    """The rows of an earlier run written to ``out`` with the same model, records and corpus (else none)."""
    try:
        earlier = json.loads(Path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    same = all(earlier.get(key) == result[key] for key in ("model", "data", "n", "corpus"))
    return list(earlier.get("rows", [])) if same else []


if __name__ == "__main__":
    main()
