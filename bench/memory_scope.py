"""Memory packs' scope: each route's scores, and how often it wrongly answers the subject's other relations.

    python3 -m bench.memory_scope [--model M] [--dtype D] [--facts SPEC] [--n 100] [--neighbours K]
                                 [--probes 300] [--routes context,answer,ike] [--margins none,0.2]
                                 [--demonstrations K] [--contrasts 0,0.5] [--plausibility P] [--true-facts]

Two measurements per route (``context``, ``answer``, ``ike``) and scope (``--margins``: ``none`` checks the
subject only; a number is the relation check's ``relation_margin``, see ``editpack.packs.memory``):

- reliability, generalization and locality of one memory pack holding the first ``--n`` records of
  ``counterfact-edit.json`` under the three protocols (teacher-forced ones read the answer after the text the
  memory gives the model), ``generate_match`` first (the unedited model measured once, in the same run).
  ``--facts counterfact:…/counterfact_rome_format_348.json`` scores CounterFact's original records instead: two
  true paraphrases each, where the flattened file's one ``rephrase_prompt`` is mostly a generation prompt (an
  open continuation such as "X's work office is surrounded by", whose greedy answer need not start with the
  target), and ten neighbourhood prompts (``--neighbours K`` keeps the first K, for a slow model);
- the **same-subject, other-relation probe set**: prompts about an edited fact's subject that ask another
  relation, whose true answer differs from the fact's. From CounterFact (``counterfact-edit.json`` and
  ``counterfact-train.json``: records sharing a subject, their relations found from CounterFact's phrasings in
  ``editpack/suites/relation_templates.json`` and MQuAKE's rewrite templates) and MQuAKE (``MQuAKE-hard.json``:
  a rewrite's subject in another case's single-hop cloze of another relation). One memory pack holds every
  probed fact; a probe is **wrongly answered** when the greedy answer (8 tokens) starts with the fact's new
  target. The rate in scope (routed to the memory) is reported beside it, and the unedited model's own rate.

``--demonstrations K`` sets how many of the pack's facts demonstrate under the ``ike`` route (default the
library's, ``editpack.packs.memory.IKE_DEMONSTRATIONS``). ``--contrasts`` lists the context-aware decoding weights
(``contrast``, see ``editpack.model.generation.Contrast``) to score the in-context routes (``context``, ``ike``) with;
the ``answer`` route is scored once, without. Default: each route's own default (``ike`` 0.5, the others 0).
``--plausibility`` sets the contrast's floor (default each route's own: ``ike`` none, the others 0.1).

``--true-facts`` adds a control to each route (``true_fact_control``): a pack stating every record's *true*
fact, with the same settings and scope threshold, scored by generate_match on the same rephrase prompts against
the true answer. A fact the model need not be talked out of, stated the same way, shows how much of a route's
generalization the prompt set itself allows (many of CounterFact's generation prompts are answered by the fact
in another form: " the Netherlands" for Dutch, " funeral in Rome" for Rome).

Each route's generate_match generalization is also split by the kind of paraphrase prompt
(``generalization_by_kind``, :func:`rephrase_kind`): CounterFact's paraphrases open with an unrelated sentence
before the question, its generation prompts do not, and the flattened file's ``rephrase_prompt`` is one or the
other (88 of its first 100 are generation prompts).

Prints one JSON object (``--out`` also writes it), with the route and margin that the rule below picks:
reliability, generalization and locality each at least the floor given (``--floors``), then the lowest
wrong-answer rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path


import editpack  # noqa: E402
import editpack.console  # noqa: E402
from editpack import suites  # noqa: E402
from editpack.evaluation.protocols import combine, measure, starts_with  # noqa: E402
from editpack.errors import InvalidFactError  # noqa: E402
from editpack.facts import Fact  # noqa: E402
from editpack.packs.memory.routes import IKE_DEMONSTRATIONS  # noqa: E402
from editpack.methods.ike import IKEConfig  # noqa: E402
from editpack.methods.serac import SERACConfig  # noqa: E402
from editpack.model.loading import DTYPE_CHOICES  # noqa: E402

from bench._common import DATA, REPO, emit  # noqa: E402


def relation_templates(data: Path) -> dict[str, str]:
    """Phrasing (``{}`` for the subject) → Wikidata relation id: CounterFact's and MQuAKE's rewrite templates."""
    found = {p: r for r, phrasings in suites.load("relation_templates").items.items() for p in phrasings}
    for case in json.loads((data / "mquake" / "MQuAKE-hard.json").read_text()):
        for rewrite in case["requested_rewrite"]:
            found.setdefault(rewrite["prompt"], rewrite["relation_id"])
    return found


def scored_facts(spec: str, n: int, neighbours: int | None = None) -> list[Fact]:
    """The first ``n`` valid records of ``spec`` (as ``editpack bench --data`` takes it), each keeping its first
    ``neighbours`` neighbourhood prompts (all when ``None``)."""
    facts = editpack.load_facts(spec, limit=n, skip_invalid=True)
    if neighbours is None:
        return facts
    return [dataclasses.replace(f, neighborhood=f.neighborhood[:neighbours]) for f in facts]


#: A sentence's end (with a closing quote or bracket after it) and the space before the next sentence.
SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")


def rephrase_kind(prompt: str, subject: str) -> str:
    """``"paraphrase"`` or ``"generation"``: which of CounterFact's prompt lists a rephrase prompt comes from.
    CounterFact's ``paraphrase_prompts`` put a generated sentence before the rephrased question ("Shayna does this
    and Yossel goes still and dies. Danielle Darrieux, a native"); its ``generation_prompts``, written to score
    fluency and consistency, start with the question ("Where Danielle Darrieux is from, people speak the language
    of"). So a prompt with a sentence ending before its subject is a paraphrase. Checked against the 183 records of
    ``counterfact-edit.json`` that ``counterfact_rome_format_348.json`` also holds, whose lists say which it is:
    all 183 right (22 paraphrases, 161 generation prompts)."""
    at = prompt.find(subject)
    return "paraphrase" if SENTENCE_END.search(prompt[:at] if at >= 0 else prompt) else "generation"


def generalization_by_kind(facts: Sequence[Fact], answers: Sequence[Sequence[str]]) -> dict:
    """generate_match generalization (the greedy answer starts with the new target) per :func:`rephrase_kind`."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for fact, row in zip(facts, answers):
        for prompt, answer in zip(fact.paraphrases, row):
            hits[rephrase_kind(prompt, fact.subject)].append(starts_with(answer, fact.target_new))
    return {kind: {"n": len(v), "generate_match": round(sum(v) / len(v), 4)} for kind, v in sorted(hits.items())}


def probe_set(data: Path, limit: int, seed: int = 0) -> list[tuple[Fact, str, str]]:
    """``(fact, prompt, true answer)``: prompts about the fact's subject that ask another relation."""
    templates = relation_templates(data)

    def relation(prompt: str, subject: str) -> str | None:
        return templates.get(prompt.replace(subject, "{}", 1)) if subject in prompt else None

    counterfact: list[tuple[Fact, str, str]] = []
    by_subject: dict[str, list[tuple[Fact, str]]] = defaultdict(list)
    for name in ("counterfact-edit.json", "counterfact-train.json"):
        for fact in editpack.load_facts(f"counterfact:{data / 'counterfact' / name}", skip_invalid=True):
            found = relation(fact.text, fact.subject)
            if found:
                by_subject[fact.subject].append((fact, found))
    for facts in by_subject.values():
        for fact, rel in facts:
            seen = set()
            for other, other_rel in facts:
                if (other_rel != rel and other.text not in seen
                        and (other.target_true or "").lower() != (fact.target_true or "").lower()):
                    seen.add(other.text)
                    counterfact.append((fact, other.text, other.target_true or ""))

    mquake: list[tuple[Fact, str, str]] = []
    cases = json.loads((data / "mquake" / "MQuAKE-hard.json").read_text())
    hops = {(h["cloze"], h["answer"]) for case in cases for h in case["single_hops"]}
    rewrites = {(r["prompt"], r["subject"], r["target_new"]["str"], r["target_true"]["str"], r["relation_id"])
                for case in cases for r in case["requested_rewrite"]}
    for prompt, subject, new, true, rel in sorted(rewrites):
        fact = editpack.make_fact(prompt, subject, new, true, relation=rel)
        for cloze, answer in sorted(hops):
            other_rel = relation(cloze, subject)
            if other_rel and other_rel != rel and answer.lower() != true.lower():
                mquake.append((fact, cloze, answer))
    rng = random.Random(seed)
    rng.shuffle(counterfact)
    take_mquake = min(len(mquake), limit // 4)
    return mquake[:take_mquake] + counterfact[: limit - take_mquake]


def route_defaults(route: str) -> SERACConfig:
    """The settings a new pack of that route gets by default (``contrast``, ``plausibility``): the ``ike``
    method's, or ``serac``'s."""
    return (IKEConfig if route == "ike" else SERACConfig)()


@contextmanager
def memory_of(model, facts: Sequence[Fact], route: str, margin: float | None, threshold: float,
              demonstrations: int, contrast: float, plausibility: float):
    """The model with one memory pack of ``facts`` applied (the given route, settings and scope threshold),
    reverted on leaving."""
    memory = editpack.edit(model, facts, "serac", route=route, relation_margin=margin, threshold=threshold,
                           demonstrations=demonstrations, contrast=contrast, plausibility=plausibility)
    edited = editpack.apply(model, memory)
    try:
        yield edited
    finally:
        editpack.revert(edited)


def true_fact_control(model, tokenizer, facts: Sequence[Fact], route: str, margin: float | None, threshold: float,
                      demonstrations: int = IKE_DEMONSTRATIONS, contrast: float = 0.0,
                      plausibility: float = 0.0) -> dict:
    """The same route and settings stating each record's **true** fact (its true answer as the pack's target),
    scored by generate_match on the same rephrase prompts against the true answer: how far the prompt set lets a
    stated fact reach greedy answers that start with it, for a fact the model does not have to be talked out of.
    A route's generalization on the new facts is read against it. The scored pack's scope threshold is kept;
    records without a true answer are left out."""
    told = [dataclasses.replace(f, target_new=f.target_true) for f in facts if f.target_true and f.paraphrases]
    if not told:
        return {"n": 0, "generate_match": None, "by_kind": {}}
    with memory_of(model, told, route, margin, threshold, demonstrations, contrast, plausibility) as edited:
        flat = editpack.generate(edited, tokenizer, [p for f in told for p in f.paraphrases], max_new_tokens=8)
    it = iter(flat)
    answers = [[next(it) for _ in f.paraphrases] for f in told]
    hits = [starts_with(a, f.target_new) for f, row in zip(told, answers) for a in row]
    return {"n": len(hits), "generate_match": round(sum(hits) / len(hits), 4),
            "by_kind": generalization_by_kind(told, answers)}


def probe_rates(model, tokenizer, probes, route: str, margin: float | None, threshold: float,
                demonstrations: int = IKE_DEMONSTRATIONS, contrast: float = 0.0,
                plausibility: float = 0.0) -> dict:
    """The probe set against one pack of every probed fact, with the scope threshold of the scored pack (a pack
    of the probed facts would calibrate its own, on neighbourhood prompts that differ in kind)."""
    facts = list({id(f): f for f, _, _ in probes}.values())
    prompts = [p for _, p, _ in probes]
    with memory_of(model, facts, route, margin, threshold, demonstrations, contrast, plausibility) as edited:
        routed = edited.route(prompts)
        answers = editpack.generate(edited, tokenizer, prompts, max_new_tokens=8)
    wrong = [starts_with(a, f.target_new) for (f, _, _), a in zip(probes, answers)]
    return {"in_scope": round(sum(r is not None for r in routed) / len(probes), 4),
            "wrongly_answered": round(sum(wrong) / len(probes), 4), "n": len(probes)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES,
                        help="the model's weights (bfloat16: faster on CPUs with AMX; compare locality in float32)")
    parser.add_argument("--facts", default=None,
                        help="the scored records, as editpack bench --data takes them "
                             "(default counterfact:DATA/counterfact/counterfact-edit.json)")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--neighbours", type=int, default=None,
                        help="keep each fact's first K neighbourhood prompts (default all)")
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--routes", default="context,answer,ike")
    parser.add_argument("--margins", default="none,0.2", help="relation margins to compare; none = subject only")
    parser.add_argument("--demonstrations", type=int, default=IKE_DEMONSTRATIONS,
                        help="facts demonstrating under the ike route (default %(default)s)")
    parser.add_argument("--contrasts", default=None,
                        help="context-aware decoding weights for the context and ike routes "
                             "(default: each route's own)")
    parser.add_argument("--plausibility", type=float, default=None,
                        help="the contrast's plausibility floor, a fraction of the likeliest token's in-context "
                             "probability (default: each route's own)")
    parser.add_argument("--true-facts", action="store_true",
                        help="also score each route stating the records' true facts on the same rephrase prompts "
                             "(what the prompt set allows; a second pack per route)")
    parser.add_argument("--floors", default="0.95,0.85,0.98",
                        help="reliability, generalization, locality a route must reach to be chosen")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "memory_scope.json"))
    args = parser.parse_args(argv)
    editpack.console.configure()  # the libraries' warnings, as a normal command hides them
    data = Path(args.data)
    margins = [None if m.strip().lower() == "none" else float(m) for m in args.margins.split(",")]
    floors = dict(zip(("reliability", "generalization", "locality"), map(float, args.floors.split(","))))

    if args.neighbours is not None and args.neighbours < 1:
        parser.error("--neighbours must be at least 1")
    if args.demonstrations < 0:
        parser.error("--demonstrations must be at least 0")
    if args.plausibility is not None and not 0 <= args.plausibility < 1:
        parser.error(f"--plausibility must be at least 0 and under 1, not {args.plausibility}")
    try:
        contrasts = None if args.contrasts is None else [float(c) for c in args.contrasts.split(",")]
    except ValueError:
        parser.error(f"--contrasts takes numbers separated by commas, not {args.contrasts!r}")
    spec = args.facts or f"counterfact:{data / 'counterfact' / 'counterfact-edit.json'}"
    try:
        facts = scored_facts(spec, args.n, args.neighbours)
    except InvalidFactError as exc:  # before the model loads: a wrong --facts costs nothing
        parser.error(str(exc))
    model, tokenizer = editpack.load_model(args.model, dtype=args.dtype)
    probes = probe_set(data, args.probes)
    start = time.perf_counter()
    base = measure(model, tokenizer, facts, fluency_tokens=0)
    base_answers = editpack.generate(model, tokenizer, [p for _, p, _ in probes], max_new_tokens=8)
    result: dict = {
        "benchmark": "memory_scope", "model": model.editpack_ref.id, "dtype": args.dtype,
        "facts": Path(spec.split(":", 1)[-1]).name, "n": len(facts), "demonstrations": args.demonstrations,
        "prompts": {"paraphrase": sum(len(f.paraphrases) for f in facts),
                    "neighbourhood": sum(len(f.neighborhood) for f in facts)},
        "probes": {"n": len(probes), "mquake": sum(f.relation is not None for f, _, _ in probes),
                   "examples": [{"fact": f"{f.text} → {f.target_new}", "probe": p, "answer": a}
                                for f, p, a in probes[:3] + probes[-3:]]},
        "unedited": {"wrongly_answered": round(sum(starts_with(a, f.target_new)
                                                   for (f, _, _), a in zip(probes, base_answers)) / len(probes), 4),
                     "seconds": round(time.perf_counter() - start, 1)},
        "unedited_scores": {p: {k: v["before"] for k, v in m.items()}
                            for p, m in combine(facts, base, base)["protocols"].items()},
        "unedited_generalization_by_kind": generalization_by_kind(facts, base.gen_para),
        "floors": floors, "configs": []}
    configs = [(route, margin, contrast) for route in args.routes.split(",") for margin in margins
               for contrast in (contrasts if contrasts is not None and route != "answer" else [route_defaults(route).contrast])]
    for route, margin, contrast in configs:
        t0 = time.perf_counter()
        plausibility = route_defaults(route).plausibility if args.plausibility is None else args.plausibility
        memory = editpack.edit(model, facts, "serac", route=route, relation_margin=margin,
                               demonstrations=args.demonstrations, contrast=contrast, plausibility=plausibility)
        edited = editpack.apply(model, memory)
        try:
            after = measure(edited, tokenizer, facts, fluency_tokens=0)
        finally:
            model = editpack.revert(edited)
        protocols = combine(facts, base, after)["protocols"]
        scored = protocols["generate_match"]
        row = {"route": route, "relation_margin": margin, "contrast": contrast, "plausibility": plausibility,
               "threshold": memory.threshold,
               **{k: scored[k]["after"] for k in floors},
               "generalization_by_kind": generalization_by_kind(facts, after.gen_para),
               "protocols": {p: {k: v["after"] for k, v in m.items()} for p, m in protocols.items()},
               "probes": probe_rates(model, tokenizer, probes, route, margin, memory.threshold,
                                     args.demonstrations, contrast, plausibility),
               **({"true_fact_control": true_fact_control(model, tokenizer, facts, route, margin, memory.threshold,
                                                          args.demonstrations, contrast, plausibility)}
                  if args.true_facts else {}),
               "seconds": round(time.perf_counter() - t0, 1)}
        result["configs"].append(row)
        print(json.dumps(row), flush=True)
    safe = [r for r in result["configs"] if all((r[k] or 0) >= v for k, v in floors.items())]
    pick = min(safe or result["configs"], key=lambda r: (r["probes"]["wrongly_answered"], -r["generalization"]))
    result["chosen"] = {"route": pick["route"], "relation_margin": pick["relation_margin"],
                        "contrast": pick["contrast"],
                        "meets_floors": bool(safe)}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
