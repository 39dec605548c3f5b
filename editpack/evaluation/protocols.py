"""The evaluation engine: reliability, generalization, locality, portability and fluency under named protocols.

Protocols (every score is labelled with the protocol it was computed under):

``teacher_forced_token_acc``
    EasyEdit's protocol: with the answer fed in, the share of answer tokens the model predicts as its argmax.
    Locality is the share of the base model's argmax predictions on neighbourhood answers left unchanged.
``prob_compare``
    CounterFact's protocol: a hit when the new target is more likely than the true answer (mean per-token NLL);
    for neighbourhood prompts, when their expected answer is more likely than the new target. The mean
    probability differences (magnitudes) are reported too.
``generate_match``
    Greedy decoding with no answer given; a hit when the generation starts with the expected answer (case,
    whitespace and leading punctuation normalised, whole words). Locality is the share of neighbourhood prompts whose
    generation is the same as the base model's. Teacher forcing flatters editors; this one does not.

Relation specificity (RippleEdits' name) is the share of the edited subject's answers under other relations
(:func:`editpack.relations.same_subject_prompts`, ``same_subject`` per fact) whose greedy generation is the same
as the base model's; it is reported under ``generate_match`` only, as it compares generations.

Fluency is ROME's weighted bigram/trigram entropy of greedy free generations.
All scoring is batched with left padding (positions taken from the attention mask).
"""

from __future__ import annotations

import math
import re
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..facts import Fact, normal_text
from ..model.generation import generate
from ..model.scoring import Scored, score
from ..relations import subject_prompts_in_form
from ..runtime.apply import apply, revert

PROTOCOLS = ("teacher_forced_token_acc", "prob_compare", "generate_match")


METRICS = ("reliability", "generalization", "locality", "portability", "relation_specificity")

#: The edited subject's other relations asked per fact (its answers compared before and after): enough that one
#: prompt is under 5 % of a fact's score.
SAME_SUBJECT = 24


def normalise(text: str) -> str:
    return normal_text(re.sub(r"^[\W_]+", "", text.strip().casefold()))


def starts_with(generation: str, answer: str) -> bool:
    """Whether the generation begins with the answer, as whole words (``Rome`` does not match ``Romania``)."""
    gen, ans = normalise(generation), normalise(answer)
    if not ans or not gen.startswith(ans):
        return False
    rest = gen[len(ans) :]
    return not rest or not (rest[0].isalnum() or rest[0] == "_")


# ------------------------------------------------------------------------------------------- fluency
def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's weighted n-gram entropy of one text (bits), word-level, arithmetic mean over n."""
    tokens = re.findall(r"\w+|[^\w\s]", text.lower())
    values = []
    for n, weight in zip(ns, weights):
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(entropy * weight)
    return sum(values) / len(values)


# ------------------------------------------------------------------------------------------- per-model probes
@dataclass
class Probes:
    """Everything measured on one model (base or edited) for a list of facts."""

    edit: list[Scored]
    edit_true: list[Scored | None]
    para: list[list[Scored]]
    para_true: list[list[Scored | None]]
    neigh: list[list[Scored]]  # expected answer
    neigh_new: list[list[Scored]]  # the edit's new target, for prob_compare
    port: list[list[Scored]]
    gen_edit: list[str]
    gen_para: list[list[str]]
    gen_neigh: list[list[str]]
    gen_port: list[list[str]]
    fluency: list[float] = field(default_factory=list)
    gen_same: list[list[str]] = field(default_factory=list)  # the subject under other relations

    @classmethod
    def concat(cls, parts: Sequence["Probes"]) -> "Probes":
        """The probes of several fact lists, in order (for facts measured one edit at a time)."""
        names = [f.name for f in cls.__dataclass_fields__.values()]
        return cls(**{name: [x for part in parts for x in getattr(part, name)] for name in names})


def _nested(counts: list[int], flat: list) -> list[list]:
    out, at = [], 0
    for n in counts:
        out.append(flat[at : at + n])
        at += n
    return out


def measure(model, tokenizer, facts: Sequence[Fact], *, max_new_tokens: int = 8, fluency_tokens: int = 60,
            same_subject: int = SAME_SUBJECT, batch_size: int = 32) -> Probes:
    """Run every probe of ``facts`` on ``model`` in a few large batches (``same_subject``: the subject's other
    relations asked per fact; 0 asks none)."""
    para_n = [len(f.paraphrases) for f in facts]
    neigh_n = [len(f.neighborhood) for f in facts]
    port_n = [len(f.portability) for f in facts]
    paras = [p for f in facts for p in f.paraphrases]
    neighs = [(p.prompt, p.answer, f.target_new) for f in facts for p in f.neighborhood]
    ports = [(p.prompt, p.answer) for f in facts for p in f.portability]
    with_true = [f for f in facts if f.target_true]
    pairs = ([(f.text, f.target_new) for f in facts] + [(f.text, f.target_true) for f in with_true]
             + [(p, f.target_new) for f in facts for p in f.paraphrases]
             + [(p, f.target_true) for f in with_true for p in f.paraphrases]
             + [(p, a) for p, a, _ in neighs] + [(p, new) for p, _, new in neighs] + ports)
    scored = score(model, tokenizer, pairs, batch_size)
    it = iter(scored)
    take = lambda n: [next(it) for _ in range(n)]  # noqa: E731
    edit = take(len(facts))
    true_iter = iter(take(len(with_true)))
    edit_true = [next(true_iter) if f.target_true else None for f in facts]
    para = _nested(para_n, take(len(paras)))
    para_true_flat = iter(take(sum(len(f.paraphrases) for f in with_true)))
    para_true = [[next(para_true_flat) for _ in f.paraphrases] if f.target_true else [None] * len(f.paraphrases)
                 for f in facts]
    neigh = _nested(neigh_n, take(len(neighs)))
    neigh_new = _nested(neigh_n, take(len(neighs)))
    port = _nested(port_n, take(len(ports)))

    same = subject_prompts_in_form(tokenizer, facts, same_subject) if same_subject else [[] for _ in facts]
    prompts = ([f.text for f in facts] + paras + [p for p, _, _ in neighs] + [p for p, _ in ports]
               + [p for row in same for p in row])
    gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size) if prompts else []
    gen_edit, rest = gens[: len(facts)], gens[len(facts) :]
    gen_para = _nested(para_n, rest[: len(paras)])
    gen_neigh = _nested(neigh_n, rest[len(paras) : len(paras) + len(neighs)])
    at = len(paras) + len(neighs) + len(ports)
    gen_port = _nested(port_n, rest[len(paras) + len(neighs) : at])
    gen_same = _nested([len(row) for row in same], rest[at:])
    fluency = []
    if fluency_tokens:
        free = generate(model, tokenizer, [f.text for f in facts], max_new_tokens=fluency_tokens, batch_size=batch_size)
        fluency = [ngram_entropy(f.text + text) for f, text in zip(facts, free)]
    return Probes(edit, edit_true, para, para_true, neigh, neigh_new, port, gen_edit, gen_para, gen_neigh,
                  gen_port, fluency, gen_same)


def same_subject_answers(tokenizer, facts: Sequence[Fact], probes: Probes,
                         same_subject: int = SAME_SUBJECT) -> dict[str, str]:
    """The same-subject prompts :func:`measure` asked (with ``same_subject`` per fact) and the answers in
    ``probes``, so a later suite on the same model need not generate them again."""
    prompts = subject_prompts_in_form(tokenizer, facts, same_subject) if same_subject else []
    return {p: a for row, answers in zip(prompts, probes.gen_same) for p, a in zip(row, answers)}


# ------------------------------------------------------------------------------------------- protocols
def _mean(values: list[float]) -> tuple[float | None, int]:
    return (sum(values) / len(values) if values else None), len(values)


def _prob(s: Scored) -> float:
    return math.exp(-s.nll)


def protocol_scores(protocol: str, facts: Sequence[Fact], probes: Probes, base: Probes) -> dict[str, dict]:
    """Per-metric mean and count for ``protocol``; ``base`` is the unedited model (for locality)."""
    flat = lambda nested: [x for row in nested for x in row]  # noqa: E731
    out: dict[str, dict] = {}
    same: list[float] = []
    if protocol == "teacher_forced_token_acc":
        rel = [s.token_acc for s in probes.edit]
        gen = [s.token_acc for s in flat(probes.para)]
        loc = [sum(a == b for a, b in zip(s.predictions, t.predictions)) / len(s.answer)
               for s, t in zip(flat(probes.neigh), flat(base.neigh))]
        port = [s.token_acc for s in flat(probes.port)]
    elif protocol == "prob_compare":
        rel = [float(s.nll < t.nll) for s, t in zip(probes.edit, probes.edit_true) if t is not None]
        gen = [float(s.nll < t.nll) for s, t in zip(flat(probes.para), flat(probes.para_true)) if t is not None]
        loc = [float(a.nll < n.nll) for a, n in zip(flat(probes.neigh), flat(probes.neigh_new))]
        port = [float(s.nll < 2.0) for s in flat(probes.port)]  # no rival answer: likely enough (p > e^-2)
        out["efficacy_magnitude"] = _entry([_prob(s) - _prob(t) for s, t in zip(probes.edit, probes.edit_true) if t])
        out["paraphrase_magnitude"] = _entry(
            [_prob(s) - _prob(t) for s, t in zip(flat(probes.para), flat(probes.para_true)) if t])
        out["neighborhood_magnitude"] = _entry(
            [_prob(a) - _prob(n) for a, n in zip(flat(probes.neigh), flat(probes.neigh_new))])
    elif protocol == "generate_match":
        rel = [float(starts_with(g, f.target_new)) for g, f in zip(probes.gen_edit, facts)]
        gen = [float(starts_with(g, f.target_new)) for row, f in zip(probes.gen_para, facts) for g in row]
        loc = [float(normalise(a) == normalise(b)) for a, b in zip(flat(probes.gen_neigh), flat(base.gen_neigh))]
        port = [float(starts_with(g, p.answer)) for row, f in zip(probes.gen_port, facts)
                for g, p in zip(row, f.portability)]
        same = [float(normalise(a) == normalise(b)) for a, b in zip(flat(probes.gen_same), flat(base.gen_same))]
    else:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    for name, values in (("reliability", rel), ("generalization", gen), ("locality", loc), ("portability", port)):
        out[name] = _entry(values)
    if same:  # generate_match only
        out["relation_specificity"] = _entry(same)
    return {k: out[k] for k in sorted(out, key=lambda k: (k not in METRICS, METRICS.index(k) if k in METRICS else 0, k))}


def _entry(values: list[float]) -> dict:
    mean, n = _mean(values)
    return {"mean": None if mean is None else round(mean, 6), "n": n}


def check_protocols(protocols: Sequence[str]) -> None:
    """Raise before any measurement when a protocol name is unknown."""
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")


def combine(facts, base: Probes, after: Probes, protocols: Sequence[str] = PROTOCOLS) -> dict:
    result: dict = {"n_facts": len(facts), "protocols": {}}
    for protocol in protocols:
        before_scores = protocol_scores(protocol, facts, base, base)
        after_scores = protocol_scores(protocol, facts, after, base)
        result["protocols"][protocol] = {
            metric: {"before": before_scores[metric]["mean"], "after": after_scores[metric]["mean"],
                     "n": after_scores[metric]["n"]}
            for metric in after_scores
        }
    result["fluency"] = {"metric": "ngram_entropy", "before": _entry(base.fluency)["mean"],
                         "after": _entry(after.fluency)["mean"], "n": len(after.fluency)}
    result["examples"] = [{"prompt": f.text, "before": b, "after": a}
                          for f, b, a in list(zip(facts, base.gen_edit, after.gen_edit))[:5]]
    return result


def bench_edits(model, tokenizer, facts: Sequence[Fact], edit_one: Callable[[Fact], object], *,
                protocols: Sequence[str] = PROTOCOLS, max_new_tokens: int = 8, fluency_tokens: int = 60,
                same_subject: int = SAME_SUBJECT, on_edit: Callable[[int, float], None] | None = None) -> dict:
    """Edit each fact on its own (``edit_one(fact)`` returns a pack; the model is restored between edits) and
    score all protocols before/after, with seconds per edit and peak resident memory. ``on_edit(i, seconds)`` is
    called after the ``i``-th edit (a long run's progress)."""

    kwargs = dict(max_new_tokens=max_new_tokens, fluency_tokens=fluency_tokens, same_subject=same_subject)
    base = measure(model, tokenizer, facts, **kwargs)
    parts, seconds = [], []
    for fact in facts:
        start = time.perf_counter()
        pack = edit_one(fact)
        seconds.append(time.perf_counter() - start)
        if on_edit is not None:
            on_edit(len(seconds), seconds[-1])
        edited = apply(model, pack)
        try:
            parts.append(measure(edited, tokenizer, [fact], **kwargs))
        finally:
            model = revert(edited)
    result = combine(facts, base, Probes.concat(parts), protocols)
    result["seconds_per_edit"] = {"mean": round(sum(seconds) / len(seconds), 3), "first": round(seconds[0], 3),
                                  "mean_excluding_first": round(sum(seconds[1:]) / max(1, len(seconds) - 1), 3)}
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def format_table(result: dict) -> str:
    """A plain-text table of a result: one row per protocol and metric, before / after / n."""
    lines = [f"{'protocol':<26} {'metric':<24} {'before':>8} {'after':>8} {'n':>6}"]
    for protocol, metrics in result["protocols"].items():
        for metric, row in metrics.items():
            cell = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
            lines.append(f"{protocol:<26} {metric:<24} {cell(row['before']):>8} {cell(row['after']):>8} {row['n']:>6}")
    fluency = result.get("fluency") or {}
    if fluency.get("n"):
        lines.append(f"{'fluency':<26} {'ngram_entropy (bits)':<24} {fluency['before']:>8.3f} {fluency['after']:>8.3f} "
                     f"{fluency['n']:>6}")
    side = result.get("side_effects")
    if side:
        lines.append(f"side effects: {side['verdict']}")
        for name, claim in side["claims"].items():
            share = claim["protocol"] == "generate_match"
            cell = lambda v: "-" if v is None else (f"{100 * v:.1f}" if share else f"{v:.4g}")  # noqa: E731
            lines.append(f"{'  ' + name:<26} {claim['protocol'] + ' / ' + claim['suite']:<24} "
                         f"{cell(claim['before']):>8} {cell(claim['after']):>8} {claim['n']:>6}")
    return "\n".join(lines)
