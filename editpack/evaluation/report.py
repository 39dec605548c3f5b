"""Evaluating a pack: its facts under the three protocols, plus what the edit does to everything else.

:func:`evaluate_pack` measures the base model and the model with the pack applied (unmerged, then removed):
the facts' reliability, generalization, locality and portability (``editpack.evaluation.protocols``), with paraphrases from
relation templates where a fact brings none, and the side effects on the shipped suites
(``editpack.evaluation.side_effects``). :func:`evaluate_and_store` writes the result into the pack's manifest and card.
:func:`rerun` measures a pack again on this machine and compares every claim its card makes, within stated
tolerances, so a card from the Hub is a claim anyone can check.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .. import suites
from ..chat import chat_facts, facts_form
from ..errors import EditpackError
from ..facts import Fact, split_format
from ..runtime.apply import apply, revert
from . import side_effects
from .protocols import PROTOCOLS, check_protocols, combine, measure, ngram_entropy, same_subject_answers

#: The settings a stored evaluation records (and a rerun reuses).
DEFAULTS = {"max_new_tokens": 8, "fluency_tokens": 60}


def evaluate_pack(model, tokenizer, pack, facts: Sequence[Fact] | None = None, *, data: str | None = None,
                  protocols: Sequence[str] = PROTOCOLS, default_probes: bool = True,
                  suite_settings: side_effects.SuiteSettings | None = None, max_new_tokens: int = 8,
                  fluency_tokens: int = 60, chat: bool = False) -> dict:
    """Evaluate ``pack`` on ``model`` (its own facts unless ``facts`` are given); returns the result dict.

    ``chat=True`` puts the given ``facts`` in the tokenizer's chat form first (:func:`editpack.chat.chat_fact`), as
    a pack edited with ``chat=True`` holds its own; the settings record it, so :func:`rerun` does the same.

    With ``default_probes`` (the default) facts without paraphrases get them from relation templates where
    their relation is known, and the side effects are measured on the shipped suites. The model is left as it
    was: the pack is applied unmerged for the "after" measurements, then removed.
    """
    check_protocols(protocols)
    if chat and facts is None:
        raise EditpackError("chat form applies to facts given to evaluate on; a pack's own facts are already in the "
                            "form they were edited in")
    started = time.perf_counter()
    facts = chat_facts(tokenizer, facts) if chat else list(facts) if facts is not None else list(pack.facts)
    origin = None
    if default_probes:
        facts, origin = side_effects.with_default_paraphrases(facts, tokenizer)
    # the suites are asked in the form the facts are (a rerun takes the form its evaluation records)
    settings = suite_settings or side_effects.SuiteSettings(form="chat" if facts_form(tokenizer, facts) == "chat"
                                                            else "plain")
    kwargs = dict(max_new_tokens=max_new_tokens, fluency_tokens=fluency_tokens)
    # With the suites, the probes' free generations of the edit prompts are generated in the fluency suite's
    # batches (not one sequence at a time), and the same-subject prompts the probes asked are not asked again.
    free = [f.text for f in facts] if default_probes and fluency_tokens else []

    def probes_and_suites(on, reuse: bool, drafts=None):
        probes = measure(on, tokenizer, facts, **dict(kwargs, fluency_tokens=0 if free else fluency_tokens))
        if not default_probes:
            return probes, None
        answered = same_subject_answers(tokenizer, facts, probes) if settings.max_new_tokens == max_new_tokens else {}
        snap = side_effects.snapshot(on, tokenizer, pack.facts, settings, logits=pack.scores_logits, reuse=reuse,
                                     answered=answered, continue_texts=free, continue_tokens=fluency_tokens,
                                     continue_drafts=probes.gen_edit if free else None, drafts=drafts)
        if free:
            probes.fluency = [ngram_entropy(text + more) for text, more in zip(free, snap.continuations)]
        return probes, snap

    base, base_snap = probes_and_suites(model, reuse=True)
    edited = apply(model, pack, tokenizer=tokenizer)
    try:  # the unedited model's answers are the drafts the edited model's suites are checked against
        after, after_snap = probes_and_suites(edited, reuse=False, drafts=base_snap)
    finally:
        revert(edited)
    result = combine(facts, base, after, protocols)
    result["data"] = portable_data_name(data) if data else "pack facts"
    result["settings"] = dict(kwargs, default_probes=default_probes, **({"chat": True} if chat else {}))
    if default_probes:
        claims = side_effects.compare(base_snap, after_snap)
        result["generalization_origin"] = origin
        result["side_effects"] = {
            "claims": claims,
            "verdict": side_effects.verdict(claims),
            "settings": asdict(settings),
            "suites": {name: suites.load(name).describe() for name in suites.FILES},
        }
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def portable_data_name(data: str) -> str:
    """``[format:]PATH`` as recorded in a manifest: the format and the file's name, never its local path."""
    fmt, path = split_format(data)
    return f"{fmt}:{Path(path).name}" if fmt != "auto" else Path(path).name


def evaluate_and_store(model, tokenizer, pack, facts: Sequence[Fact] | None = None, *, data: str | None = None,
                       **kwargs) -> tuple[dict, bool]:
    """:func:`evaluate_pack`, then the results written into the pack's manifest and card (atomically).

    Returns ``(result, stored)``: a pack read in place from the Hugging Face cache (``pack.source``) is not
    written to (the cache must stay as downloaded); nor is a pack that was never saved.
    """
    result = evaluate_pack(model, tokenizer, pack, facts, data=data, **kwargs)
    pack.evaluation = result
    if pack.source or pack.path is None:
        return result, False
    pack.save(pack.path, overwrite=True)
    return result, True


# ---------------------------------------------------------------------------------------------- checking a card
@dataclass(frozen=True)
class Check:
    """One claim of a card, as stored and as measured again."""

    claim: str
    stored: float | None
    measured: float | None
    tolerance: float

    @property
    def ok(self) -> bool:
        if self.stored is None or self.measured is None:
            return self.stored is None and self.measured is None
        return abs(self.stored - self.measured) <= self.tolerance + 1e-9

    def __str__(self) -> str:
        fmt = lambda v: "–" if v is None else f"{v:.4g}"  # noqa: E731
        return (f"{self.claim}: the card says {fmt(self.stored)}, measured here {fmt(self.measured)} "
                f"(tolerance ±{self.tolerance:.3g})")


#: Tolerances for a rerun on another machine (the same machine and software reproduce every number exactly):
#: shares may move by 0.02, plus one probe's worth when there are 20 or more; probability differences by 0.02;
#: KL by 10 % + 0.001; perplexity by 1 %; fluency by 0.05 bits.
def tolerance(kind: str, value: float | None, n: int) -> float:
    if kind in ("share",):
        return 0.02 + (1 / n if n >= 20 else 0.0)
    if kind == "magnitude":
        return 0.02
    if kind == "next_token_kl":
        return 0.1 * abs(value or 0.0) + 1e-3
    if kind == "perplexity":
        return 0.01 * abs(value or 0.0)
    return 0.05  # n-gram entropy, bits


def claims_of(evaluation: dict) -> dict[str, tuple[float | None, str, int]]:
    """Every number a stored evaluation claims: ``name -> (value, kind, n)``."""
    out: dict[str, tuple[float | None, str, int]] = {}
    for protocol, metrics in evaluation.get("protocols", {}).items():
        for metric, row in metrics.items():
            kind = "magnitude" if metric.endswith("_magnitude") else "share"
            for when in ("before", "after"):
                out[f"{protocol}/{metric}/{when}"] = (row.get(when), kind, row.get("n") or 0)
    fluency = evaluation.get("fluency") or {}
    for when in ("before", "after"):
        if fluency.get("n"):
            out[f"fluency/ngram_entropy/{when}"] = (fluency.get(when), "entropy", fluency["n"])
    for name, claim in ((evaluation.get("side_effects") or {}).get("claims") or {}).items():
        kind = {"generate_match": "share"}.get(claim["protocol"], claim["protocol"])
        for when in ("before", "after"):
            out[f"side_effects/{name}/{when}"] = (claim.get(when), kind, claim.get("n") or 0)
    return out


def rerun(model, tokenizer, pack, facts: Sequence[Fact] | None = None) -> list[Check]:
    """Measure ``pack`` again with the protocols, probes and settings its evaluation records; one
    :class:`Check` per claim (see :func:`tolerance`). Raises when the evaluation cannot be reproduced here (no
    evaluation, other suites, data that is not at hand)."""
    stored = pack.evaluation
    if not stored:
        raise EditpackError(f"{pack.ref} holds no evaluation to check (evaluate it with `editpack eval`)")
    if stored.get("data", "pack facts") != "pack facts" and facts is None:
        raise EditpackError(f"{pack.ref} was evaluated on {stored['data']}; pass that data (--data) to rerun it")
    side = stored.get("side_effects")
    if side:
        for name, described in side["suites"].items():
            here = suites.load(name).sha256 if name in suites.FILES else None
            if here != described["sha256"]:
                raise EditpackError(f"{pack.ref} was measured on another version of the {name} suite "
                                    f"(sha256 {described['sha256'][:12]}…, this editpack ships "
                                    f"{(here or 'none')[:12]}…); it cannot be rerun with this editpack")
    settings = {**DEFAULTS, **(stored.get("settings") or {})}
    again = evaluate_pack(
        model, tokenizer, pack, facts, data=None, protocols=list(stored.get("protocols") or PROTOCOLS),
        default_probes=bool(settings.get("default_probes", side is not None)),
        # (an evaluation recorded before the same-subject cap existed used every fact)
        suite_settings=side_effects.SuiteSettings(**{"same_subject_facts": 10**9, **side["settings"]}) if side else None,
        max_new_tokens=settings["max_new_tokens"], fluency_tokens=settings["fluency_tokens"],
        chat=bool(settings.get("chat")) and facts is not None,
    )
    measured = claims_of(again)
    checks = []
    for name, (value, kind, n) in claims_of(stored).items():
        found = measured.get(name, (None, kind, n))[0]
        checks.append(Check(name, value, found, tolerance(kind, value, n)))
    return checks
