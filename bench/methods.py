"""Every method on the same records, one JSON file each: what ``docs/results/methods.md`` and the README's
"choosing a method" table are generated from (``scripts/generated_tables.py``).

    python3 -m bench.methods [--methods rome,memit,…] [--n 50] [--set METHOD:KEY=VALUE …] [--out-dir DIR]
    python3 -m bench.methods --small            # its own code path on a tiny model, in seconds

Each method is run the way it is used (``MODES``): ``each`` edits every record on its own, the model restored
between edits (``editpack bench``); ``batch`` edits all of them in one call (MEMIT, AlphaEdit) or into one pack (a
memory: SERAC, IKE). Either way the records are scored before and after under the three protocols
(efficacy = reliability, paraphrase = generalization, neighbourhood = locality) with fluency, seconds per edit
and peak memory. Key statistics come from ``--corpus`` and are computed before the clock starts. A method that
needs a trained editor (MEND) takes it with ``--set mend:editor=DIR``. Results: ``--out-dir`` (default
``bench/results/methods``), ``<method>.json`` each, with the command, date, commit and machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import editpack
from bench._common import DATA, REPO, checkpoint
from editpack.evaluation.protocols import PROTOCOLS, SAME_SUBJECT, bench_edits, combine, measure
from editpack.methods import REGISTRY
from editpack.methods.base import parse_settings

#: How each method is benchmarked: records one at a time, or all in one edit.
MODES = {"memit": "batch", "alphaedit": "batch", "serac": "batch", "ike": "batch"}
DEFAULT_METHODS = "rome,memit,alphaedit,ft,lora,kn,grace,serac,ike"


def settings_by_method(items: list[str]) -> dict[str, dict]:
    """``["mend:steps=2", …]`` as ``{"mend": {"steps": 2}}``."""
    out: dict[str, dict] = {}
    for item in items:
        method, sep, rest = item.partition(":")
        if not sep or method not in REGISTRY:
            raise SystemExit(f"--set takes METHOD:KEY=VALUE with a registered method, not {item!r}")
        out.setdefault(method, {}).update(parse_settings([rest]))
    return out


def commit() -> str | None:
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or None


def run_method(model, tokenizer, facts, method: str, hparams: dict, *, mode: str | None = None,
               **measuring) -> dict:
    """Edit ``facts`` with ``method`` in its ``mode`` (``MODES``, or the one given) and score them; ``measuring`` goes
    to :func:`measure` (``same_subject``, ``fluency_tokens``)."""
    mode = mode or MODES.get(method, "each")
    if mode == "each":
        def progress(i: int, seconds: float) -> None:
            print(f"{method}: edit {i}/{len(facts)} in {seconds:.1f} s", flush=True)

        result = bench_edits(model, tokenizer, facts, lambda fact: editpack.edit(model, fact, method,
                                                                                 tokenizer=tokenizer, **hparams),
                             protocols=PROTOCOLS, on_edit=progress, **measuring)
    else:
        base = measure(model, tokenizer, facts, **measuring)
        start = time.perf_counter()
        pack = editpack.edit(model, facts, method, tokenizer=tokenizer, **hparams)
        seconds = time.perf_counter() - start
        edited = editpack.apply(model, pack, tokenizer=tokenizer)
        try:
            result = combine(facts, base, measure(edited, tokenizer, facts, **measuring), PROTOCOLS)
        finally:
            editpack.revert(edited)
        result["seconds_per_edit"] = {"mean": round(seconds / len(facts), 3), "batch_seconds": round(seconds, 1)}
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return {"method": method, "mode": mode, **result}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the default built-in")
    parser.add_argument("--data", default=f"counterfact:{DATA / 'counterfact' / 'counterfact-edit.json'}")
    parser.add_argument("--n", type=int, default=50, help="the first N records")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--corpus", default=str(REPO / "tests" / "data" / "wikipedia-slice.jsonl"))
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="METHOD:KEY=VALUE")
    parser.add_argument("--out-dir", default=str(REPO / "bench" / "results" / "methods"))
    parser.add_argument("--batch", default="", help="methods to edit all records in one call, beyond MODES (grace)")
    parser.add_argument("--same-subject", type=int, default=SAME_SUBJECT,
                        help="same-subject prompts per fact (relation specificity); 0 skips them")
    parser.add_argument("--fluency-tokens", type=int, default=60, help="tokens generated for fluency; 0 skips it")
    parser.add_argument("--small", action="store_true", help="a tiny model and 3 shipped records (a test's run)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    batch = {m for m in args.batch.split(",") if m}
    unknown = [m for m in methods + sorted(batch) if m not in REGISTRY]
    if unknown or args.n < 1:
        parser.error(f"unknown methods {unknown}" if unknown else "--n must be at least 1")
    per_method = settings_by_method(args.settings)
    if args.small:
        from editpack.testing import tiny_model, tiny_tokenizer

        model, tokenizer = tiny_model(), tiny_tokenizer()
        model.editpack_tokenizer = tokenizer
        args.data, args.n = f"counterfact:{REPO / 'tests' / 'data' / 'counterfact-edit-25.json'}", 3
        for method in methods:
            per_method[method] = {**REGISTRY[method].tiny_settings, **per_method.get(method, {})}
    else:
        model, tokenizer = editpack.load_model(args.model)
    facts = editpack.load_facts(args.data, limit=args.n, skip_invalid=True)
    command = "python3 -m bench.methods " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {}
    for method in methods:
        hparams = dict(per_method.get(method, {}))
        if REGISTRY[method].takes("stats_corpus") and "mom2_adjustment" not in hparams and Path(args.corpus).is_file():
            hparams.setdefault("stats_corpus", args.corpus)
            editpack.edit(model, facts[0], method, tokenizer=tokenizer, **hparams)  # statistics: not timed
        mode = "batch" if method in batch else MODES.get(method, "each")
        print(f"{method}: {len(facts)} records, {mode}", flush=True)
        found = run_method(model, tokenizer, facts, method, hparams, mode=mode, same_subject=args.same_subject,
                           fluency_tokens=args.fluency_tokens)
        recorded = {k: (Path(v).name if k in ("stats_corpus", "editor") and isinstance(v, str) else v)
                    for k, v in hparams.items()}
        found.update({"model": model.editpack_ref.id if hasattr(model, "editpack_ref") else "tiny-llama",
                      "data": f"{args.data.split(':')[0]}:{Path(args.data.split(':', 1)[-1]).name}", "n": len(facts),
                      "hyperparameters": recorded, "command": command,
                      "date": datetime.date.today().isoformat(), "commit": commit(),
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
                      "editpack": editpack.__version__})
        checkpoint(found, Path(args.out_dir) / f"{method}.json")
        results[method] = found
        pc = found["protocols"]["prob_compare"]
        print(f"{method}: prob_compare {100 * pc['reliability']['after']:.0f} / {100 * pc['generalization']['after']:.0f}"
              f" / {100 * pc['locality']['after']:.0f}, {found['seconds_per_edit']['mean']} s/edit", flush=True)
    return results


if __name__ == "__main__":
    main()
