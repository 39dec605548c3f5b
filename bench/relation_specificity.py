"""Relation specificity: what an edit of one relation does to the edited subject's other relations.

    python3 -m bench.relation_specificity [--n 100] [--methods rome,memit] [--retain 0,1] [--mquake 20]
    python3 -m bench.relation_specificity --retain 1 --set paraphrase_prompts=4   # settings for every edit
    python3 -m bench.relation_specificity --small        # its own code path on a tiny model

For each method and each ``retain_factor`` in ``--retain`` (0: no retention term), the first ``--n`` CounterFact
records are edited (ROME, GRACE: each record alone, the model restored between edits; MEMIT, AlphaEdit: all in
one batch) and scored under prob_compare and generate_match (efficacy, paraphrase, neighbourhood). The subject's
other relations are asked before and after (``editpack.relations.same_subject_prompts``: 24 per record, phrasings
the retention term never sees), and the share of answers that changed is reported two ways: the whole 8-token
greedy generation (the card's measure) and its first word (the answer itself).

A control, measured in the same run, says how much of that any edit moves: the other relations of a subject
that was **not** edited (each record alone: the next record's subject; one batch: the ``--n`` records after the
batch), under the same edit.

``--eiffel`` adds the card's line for the README's example pack ("The Eiffel Tower is located in the city of" →
Rome, one edit per method and setting): its answer and how many of its 24 same-subject answers changed.

``--mquake K`` adds portability: the first K MQuAKE cases, each case's edits in one pack, and its multi-hop
questions answered (generate_match: the generation starts with the new answer; prob_compare: its NLL under 2)
before and after. Results: one JSON (``--out``), resumable: rows already there are kept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import editpack
from bench._common import DATA, REPO, checkpoint
from editpack.evaluation.protocols import Probes, combine, measure, normalise
from editpack.facts import facts_from_records
from editpack.methods.base import parse_settings

ONE_AT_A_TIME = {"rome", "grace"}
METRICS = ("reliability", "generalization", "locality")


def changed(before: list[list[str]], after: list[list[str]], words: int | None = None) -> tuple[int, int]:
    """How many of the paired generations differ (normalised; with ``words``, in their first words only)."""
    cut = (lambda s: " ".join(normalise(s).split()[:words])) if words else normalise
    pairs = [(a, b) for row_a, row_b in zip(before, after) for a, b in zip(row_a, row_b)]
    return sum(cut(a) != cut(b) for a, b in pairs), len(pairs)


def share(counts: tuple[int, int]) -> float | None:
    return round(counts[0] / counts[1], 4) if counts[1] else None


def run(model, tokenizer, facts, controls, method: str, settings: dict) -> dict:
    """One row: ``facts`` edited with ``settings``; ``controls`` are facts whose subjects are not edited."""
    kwargs = dict(fluency_tokens=0)
    base, base_control = measure(model, tokenizer, facts, **kwargs), measure(model, tokenizer, controls, **kwargs)
    start = time.perf_counter()
    if method in ONE_AT_A_TIME:
        parts, control_parts = [], []
        for fact, control in zip(facts, controls):
            edited = editpack.apply(model, editpack.edit(model, fact, method, tokenizer=tokenizer, **settings))
            try:
                probes = measure(edited, tokenizer, [fact, control], **kwargs)
            finally:
                model = editpack.revert(edited)
            own, control_part = split(probes)
            parts.append(own)
            control_parts.append(control_part)
        after, after_control = Probes.concat(parts), Probes.concat(control_parts)
    else:
        edited = editpack.apply(model, editpack.edit(model, facts, method, tokenizer=tokenizer, **settings))
        try:
            after, after_control = measure(edited, tokenizer, facts, **kwargs), measure(edited, tokenizer, controls,
                                                                                       **kwargs)
        finally:
            model = editpack.revert(edited)
    seconds = time.perf_counter() - start
    result = combine(facts, base, after)
    scores = {p: {m: result["protocols"][p][m]["after"] for m in METRICS} for p in ("prob_compare", "generate_match")}
    return {
        "method": method, "settings": settings, "scores": scores,
        "same_subject_changed": share(changed(base.gen_same, after.gen_same)),
        "same_subject_first_word_changed": share(changed(base.gen_same, after.gen_same, 1)),
        "control_changed": share(changed(base_control.gen_same, after_control.gen_same)),
        "control_first_word_changed": share(changed(base_control.gen_same, after_control.gen_same, 1)),
        "n_same_subject": changed(base.gen_same, after.gen_same)[1], "seconds": round(seconds, 1),
    }


def split(probes: Probes) -> tuple[Probes, Probes]:
    """Probes of two facts as two one-fact probes."""
    names = [f.name for f in Probes.__dataclass_fields__.values()]
    first = Probes(**{n: getattr(probes, n)[:1] if n != "fluency" else [] for n in names})
    second = Probes(**{n: getattr(probes, n)[1:2] if n != "fluency" else [] for n in names})
    return first, second


def portability(model, tokenizer, cases: list[list], method: str, settings: dict) -> dict:
    """MQuAKE: each case's edits in one pack; its multi-hop questions before and after."""
    hits = {"before": [0, 0], "after": [0, 0], "before_nll": [0, 0], "after_nll": [0, 0]}
    for case in cases:
        last = case[-1]
        base = measure(model, tokenizer, [last], fluency_tokens=0, same_subject=0)
        edited = editpack.apply(model, editpack.edit(model, case, method, tokenizer=tokenizer, **settings))
        try:
            after = measure(edited, tokenizer, [last], fluency_tokens=0, same_subject=0)
        finally:
            model = editpack.revert(edited)
        for when, probes in (("before", base), ("after", after)):
            result = combine([last], base, probes)["protocols"]
            for key, protocol in ((when, "generate_match"), (when + "_nll", "prob_compare")):
                row = result[protocol]["portability"]
                hits[key][0] += (row["after"] or 0) * row["n"]
                hits[key][1] += row["n"]
    rate = {k: round(v[0] / v[1], 4) if v[1] else None for k, v in hits.items()}
    return {"method": method, "settings": settings, "cases": len(cases), "questions": hits["after"][1],
            "generate_match": {"before": rate["before"], "after": rate["after"]},
            "prob_compare": {"before": rate["before_nll"], "after": rate["after_nll"]}}


EIFFEL = dict(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome",
              target_true="Paris")


def eiffel(model, tokenizer, method: str, settings: dict) -> dict:
    """The Eiffel pack's same-subject line: its 24 other relations' 8-token answers, changed whole and first word."""
    fact = editpack.make_fact(**EIFFEL)
    base = measure(model, tokenizer, [fact], fluency_tokens=0)
    edited = editpack.apply(model, editpack.edit(model, fact, method, tokenizer=tokenizer, **settings))
    try:
        after = measure(edited, tokenizer, [fact], fluency_tokens=0)
    finally:
        editpack.revert(edited)
    whole, n = changed(base.gen_same, after.gen_same)
    return {"method": method, "settings": settings, "answer": after.gen_edit[0].strip(), "prompts": n,
            "changed": whole, "first_word_changed": changed(base.gen_same, after.gen_same, 1)[0]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=f"counterfact:{DATA / 'counterfact' / 'counterfact-edit.json'}")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--methods", default="rome,memit")
    parser.add_argument("--retain", default="0,1", help="retain_factor values, comma-separated")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every edit")
    parser.add_argument("--mquake", type=int, default=0, help="MQuAKE cases for portability (0: none)")
    parser.add_argument("--eiffel", action="store_true", help="the Eiffel pack's same-subject line too")
    parser.add_argument("--mquake-data", default=f"mquake:{DATA / 'mquake' / 'MQuAKE-hard.json'}")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "relation_specificity.json"))
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    common = parse_settings(args.set)
    if args.small:
        from editpack.testing import TINY_LOCATE, tiny_model, tiny_tokenizer

        model, tokenizer = tiny_model(), tiny_tokenizer()
        model.editpack_tokenizer = tokenizer
        args.data, args.n = f"counterfact:{REPO / 'tests' / 'data' / 'counterfact-edit-25.json'}", 2
        args.mquake_data = f"mquake:{REPO / 'tests' / 'data' / 'mquake-hard-2.json'}"
        common = {**TINY_LOCATE, "layers": [1], "v_num_grad_steps": 3, **common}
    else:
        model, tokenizer = editpack.load_model(args.model)
    records = editpack.load_facts(args.data, limit=2 * args.n + 1, skip_invalid=True)
    facts = records[: args.n]
    result = {"benchmark": "relation_specificity", "model": getattr(getattr(model, "editpack_ref", None), "id", "tiny"),
              "data": args.data.rsplit("/", 1)[-1], "n": len(facts), "rows": [], "portability": [],
              "eiffel": []}
    try:
        earlier = json.loads(Path(args.out).read_text(encoding="utf-8"))
        if all(earlier.get(k) == result[k] for k in ("model", "data", "n")):
            for key in ("rows", "portability", "eiffel"):
                result[key] = earlier.get(key, [])
    except (OSError, ValueError):
        pass
    cases = []
    if args.mquake:
        fmt, path = args.mquake_data.split(":", 1)
        raw = json.loads(Path(path).read_text(encoding="utf-8"))[: args.mquake]
        cases = [facts_from_records([r], fmt) for r in raw]
    for method in args.methods.split(","):
        each = method in ONE_AT_A_TIME
        # one at a time: each record's control is the next record; one batch: the records after the batch
        controls = records[1 : args.n + 1] if each else records[args.n : 2 * args.n]
        for factor in (float(v) for v in args.retain.split(",")):
            settings = {**common, "retain_factor": factor}
            if not any(r["method"] == method and r["settings"] == settings for r in result["rows"]):
                row = run(model, tokenizer, facts, controls, method, settings)
                result["rows"].append(row)
                print(f"{method} retain_factor={factor:g}: changed {100 * row['same_subject_changed']:.1f} % "
                      f"(first word {100 * row['same_subject_first_word_changed']:.1f} %), control "
                      f"{100 * row['control_changed']:.1f} %, generate_match "
                      + " / ".join(f"{100 * row['scores']['generate_match'][m]:.0f}" for m in METRICS), flush=True)
                checkpoint(result, args.out)
            if cases and not any(r["method"] == method and r["settings"] == settings for r in result["portability"]):
                result["portability"].append(portability(model, tokenizer, cases, method, settings))
                checkpoint(result, args.out)
            if args.eiffel and not any(r["method"] == method and r["settings"] == settings for r in result["eiffel"]):
                row = eiffel(model, tokenizer, method, settings)
                result["eiffel"].append(row)
                print(f"{method} Eiffel pack: {row['changed']} of {row['prompts']} answers changed "
                      f"({row['first_word_changed']} first words)", flush=True)
                checkpoint(result, args.out)
    return result


if __name__ == "__main__":
    main()
