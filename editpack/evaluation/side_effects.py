"""What an edit does to everything else: default probes, measured before and after, on shipped suites.

A pack's own facts say whether the edit took. These say what else moved, on suites that ship with editpack
(``editpack/suites``, provenance in its README) so every pack is measured the same way:

``locality``
    60 unrelated prompts (CounterFact neighbourhood prompts across 34 relations, Natural Questions): the share
    whose greedy answer is unchanged, and the mean KL divergence KL(base ‖ edited) of the next-token
    distribution after each prompt.
``same_subject``
    the edited subject under other relations (the first CounterFact phrasing of up to 24 relations the fact is
    not about, from ``relation_templates``): the share of greedy answers unchanged, relation specificity. This is
    where subject-level bleed shows ("everything about the Eiffel Tower is now Rome").
``perplexity``
    on the first 1,024 tokens of held-out Wikipedia text (``heldout``): the edited model's against the base's.
``fluency``
    the weighted bi/trigram entropy of 24-token greedy continuations of 8 generic prompts.

Generalization needs paraphrases: a fact's own when it has them, else the other CounterFact phrasings of its
relation when the fact names a known relation (or its prompt is one of CounterFact's phrasings), else it is not
measured and the card says so. Every number is stored with its protocol, suite, the suite file's sha256 and n.

Facts in chat form (``editpack.chat``) are measured in that form: each suite prompt is asked as the user's turn in
the model's chat template (``SuiteSettings.form``, recorded with the settings), and a fact's relation is known by
its user's text.

Memory packs route generation only, so for them the teacher-forced numbers (KL, perplexity) are left out.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import torch

from .. import suites
from .._io import atomic_write_json, read_safetensors, write_safetensors
from ..chat import ChatFrame, chat_prompts, plain_fact
from ..facts import Fact
from ..model.fingerprint import parameters_fingerprint
from ..model.generation import generate, generate_with_first_logits, model_device
from ..paths import cache_dir
from ..relations import same_subject_prompts, template_paraphrases
from ..runtime.apply import applied
from .protocols import SAME_SUBJECT, ngram_entropy, normalise


@dataclass(frozen=True)
class SuiteSettings:
    """How much of each suite to run (sized for seconds on SmolLM2 on 2 CPU cores)."""

    locality: int = 60
    same_subject: int = SAME_SUBJECT  # other relations per fact
    same_subject_facts: int = 20  # at most this many facts, evenly spaced through the pack
    heldout_tokens: int = 1024
    fluency_prompts: int = 8
    fluency_tokens: int = 24
    max_new_tokens: int = 8
    batch_size: int = 96
    #: How the suites' prompts are asked: ``"plain"``, as written, or ``"chat"``, each the user's turn in the
    #: model's chat template (``editpack.chat``), the form a pack edited in chat form is served in.
    form: str = "plain"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, not {self.form!r}")


FORMS = ("plain", "chat")


def with_default_paraphrases(facts: Sequence[Fact], tokenizer=None) -> tuple[list[Fact], dict[str, int]]:
    """The facts, those without paraphrases given template paraphrases where their relation is known, and how
    many facts' generalization comes from where (``paraphrases``, ``relation_templates``, ``not_measured``).
    With ``tokenizer``, a fact in its chat form is known by the user's text and gets the paraphrases in chat form."""
    frame = ChatFrame.of(tokenizer) if tokenizer is not None else None
    out, origin = [], {"paraphrases": 0, "relation_templates": 0, "not_measured": 0}
    for fact in facts:
        if fact.paraphrases:
            origin["paraphrases"] += 1
            out.append(fact)
            continue
        plain = plain_fact(frame, fact)
        extra = template_paraphrases(plain)
        if extra and plain.prompt != fact.prompt:
            extra = chat_prompts(tokenizer, extra)
        origin["relation_templates" if extra else "not_measured"] += 1
        out.append(replace(fact, paraphrases=tuple(extra)) if extra else fact)
    return out, origin


def spread(items: Sequence, count: int) -> list:
    """At most ``count`` of ``items``, evenly spaced (all of them when there are few)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)] if count > 1 else [items[0]]


# ---------------------------------------------------------------------------------------------- one model
@dataclass
class Snapshot:
    """One model's answers on the suites (base or edited)."""

    locality: list[str]
    locality_logprobs: torch.Tensor | None  # (n, vocab) next-token log-probabilities; None for memory packs
    same_subject: list[str]
    heldout_nll: tuple[float, int] | None  # (total NLL, tokens); None for memory packs
    fluency: list[float]
    continuations: list[str] = field(default_factory=list)  # of ``snapshot``'s ``continue_texts``
    fluency_texts: list[str] = field(default_factory=list)  # the fluency suite's generations


@dataclass(frozen=True)
class Continuations:
    """Texts to continue greedily for ``tokens`` tokens in the fluency suite's batches, with a guess of each
    continuation's start (``drafts``: this model's shorter answer to the same text, or ``None``)."""

    texts: Sequence[str] = ()
    tokens: int = 0
    drafts: Sequence[str | None] | None = None


def snapshot(model, tokenizer, facts: Sequence[Fact], settings: SuiteSettings, *, logits: bool = True,
             reuse: bool = False, answered: dict[str, str] | None = None, continue_texts: Sequence[str] = (),
             continue_tokens: int = 0, continue_drafts: Sequence[str] | None = None,
             drafts: Snapshot | None = None) -> Snapshot:
    """Run the suites on ``model`` (teacher-forced parts only when ``logits``), their prompts in ``settings.form``.
    The subjects of ``facts`` in chat form are asked about by the user's text of their prompts.

    With ``reuse`` (the unedited model, before a pack is applied) the suites that do not depend on the facts
    (unrelated prompts, perplexity, fluency) are read from the cache when this model's weights, its tokenizer,
    the suites and the settings were measured before, and kept there otherwise (:func:`fixed_suites`).
    ``answered`` maps prompts this model has already answered greedily (with ``settings.max_new_tokens``) to
    their answers; those are not generated again. ``continue_texts`` are continued greedily for
    ``continue_tokens`` tokens in the same batches as the fluency suite (``Snapshot.continuations``): the
    probes' free generations of the edit prompts, which would otherwise decode one sequence at a time;
    ``continue_drafts`` (the probes' shorter answers to the same texts, on this model) are checked, not decoded.

    ``drafts``, the unedited model's snapshot of the same facts and settings, makes the edited model's answers
    cheaper where they did not change: each is checked with one teacher-forced forward, and only where the
    edited model departs from it is it decoded (``editpack.model.generation.generate``'s ``drafts``; the answers
    are the edited model's own either way)."""
    asked = (lambda texts: chat_prompts(tokenizer, texts)) if settings.form == "chat" else list
    frame = ChatFrame.of(tokenizer)
    facts = [plain_fact(frame, f) for f in spread(facts, settings.same_subject_facts)]
    same = asked([p for f in facts for p in same_subject_prompts(f, settings.same_subject)])
    extra = Continuations(list(continue_texts), continue_tokens, continue_drafts)
    fixed = (fixed_suites if reuse and not applied(model) else measure_fixed)(model, tokenizer, settings, logits,
                                                                              extra, drafts)
    guessed = dict(zip(same, drafts.same_subject)) if drafts is not None and len(drafts.same_subject) == len(same) \
        else {}
    return Snapshot(
        locality=fixed["locality"],
        locality_logprobs=fixed["locality_logprobs"],
        same_subject=_answers(model, tokenizer, same, settings, answered or {}, guessed),
        heldout_nll=fixed["heldout_nll"],
        fluency=fixed["fluency"],
        continuations=fixed["continuations"],
        fluency_texts=fixed["fluency_texts"],
    )


def _answers(model, tokenizer, prompts: list[str], settings: SuiteSettings, answered: dict[str, str],
             guessed: dict[str, str]) -> list[str]:
    """Greedy answers to ``prompts``, generating only those not in ``answered`` (from ``guessed``'s drafts)."""
    missing = list(dict.fromkeys(p for p in prompts if p not in answered))
    new = dict(zip(missing, generate(model, tokenizer, missing, max_new_tokens=settings.max_new_tokens,
                                     batch_size=settings.batch_size,
                                     drafts=[guessed.get(p) for p in missing] if guessed else None))) if missing else {}
    return [answered[p] if p in answered else new[p] for p in prompts]


def measure_fixed(model, tokenizer, settings: SuiteSettings, logits: bool,
                  extra: Continuations = Continuations(), drafts: Snapshot | None = None) -> dict[str, Any]:
    """The suites that do not depend on a pack's facts: unrelated prompts' answers (and, with ``logits``, their
    next-token log-probabilities), perplexity on the held-out text, fluency; and the ``continuations`` of
    ``extra``'s texts, generated in the fluency suite's batches. ``drafts``: another model's snapshot with the
    same settings, whose answers are checked before anything is decoded."""
    asked = (lambda texts: chat_prompts(tokenizer, texts)) if settings.form == "chat" else list
    loc = asked([item["prompt"] for item in suites.load("locality").items[: settings.locality]])
    generic = suites.load("generic_prompts").items[: settings.fluency_prompts]
    texts = list(extra.texts)
    fluent, answers = _guesses(drafts, len(generic), len(loc))
    guesses = fluent + list(extra.drafts or [None] * len(texts))
    free = generate(model, tokenizer, asked(generic) + texts,
                    max_new_tokens=[settings.fluency_tokens] * len(generic) + [extra.tokens] * len(texts),
                    batch_size=settings.batch_size, drafts=guesses if any(g is not None for g in guesses) else None)
    free, continued = free[: len(generic)], free[len(generic) :]
    # The next-token distribution after each prompt is the first step of its greedy answer: read off that step
    # (a memory pack's model generates text only: no logits, and none asked of it).
    if logits:
        answers, first = generate_with_first_logits(model, tokenizer, loc, max_new_tokens=settings.max_new_tokens,
                                                    batch_size=settings.batch_size, drafts=answers)
    else:
        answers = generate(model, tokenizer, loc, max_new_tokens=settings.max_new_tokens,
                           batch_size=settings.batch_size, drafts=answers)
    return {
        "locality": answers,
        "locality_logprobs": torch.log_softmax(first, dim=-1) if logits else None,
        "heldout_nll": _heldout_nll(model, tokenizer, settings) if logits else None,
        "fluency": [ngram_entropy(p + text) for p, text in zip(generic, free)],
        "fluency_texts": free,
        "continuations": continued,
    }


def _guesses(drafts: Snapshot | None, generic: int, locality: int) -> tuple[list, list | None]:
    """``drafts``' fluency texts (``None`` each where it holds none) and its unrelated prompts' answers
    (``None`` where it holds another number of them)."""
    if drafts is None or (len(drafts.fluency_texts), len(drafts.locality)) != (generic, locality):
        return [None] * generic, None
    return list(drafts.fluency_texts), list(drafts.locality)


#: How :func:`measure_fixed` measures, part of the cache key: a change to it makes earlier entries unused.
MEASURED = 3


def fixed_suites(model, tokenizer, settings: SuiteSettings, logits: bool,
                 extra: Continuations = Continuations(), drafts: Snapshot | None = None) -> dict[str, Any]:
    """:func:`measure_fixed` of an unedited model, cached under ``$EDITPACK_HOME/suites`` by the fingerprint of
    every weight, the tokenizer, the suites' sha256 and the settings: a model's second card is measured on the
    edited side only. ``extra``'s continuations depend on the facts: generated every time, never cached."""
    key = {
        "weights": parameters_fingerprint(model, [""]),
        "tokenizer": hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()
                                    + str(getattr(tokenizer, "chat_template", None)).encode()).hexdigest(),
        "suites": {name: suites.load(name).sha256 for name in ("locality", "generic_prompts", "heldout")},
        "settings": {k: v for k, v in asdict(settings).items() if not k.startswith("same_subject")},
        "logits": logits, "device": str(model_device(model)), "dtype": str(next(model.parameters()).dtype),
        "measured": MEASURED,
    }
    path = cache_dir("suites") / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}"
    record, tensors = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if record.is_file() and (tensors.is_file() or not logits):
        found = json.loads(record.read_text(encoding="utf-8"))
        found["heldout_nll"] = tuple(found["heldout_nll"]) if found["heldout_nll"] else None
        found["locality_logprobs"] = read_safetensors(tensors)["locality_logprobs"] if logits else None
        found["continuations"] = (generate(model, tokenizer, list(extra.texts), max_new_tokens=extra.tokens,
                                           batch_size=settings.batch_size, drafts=extra.drafts)
                                  if extra.texts else [])
        return found
    fixed = measure_fixed(model, tokenizer, settings, logits, extra, drafts)
    if logits:
        write_safetensors({"locality_logprobs": fixed["locality_logprobs"].contiguous()}, tensors)
    atomic_write_json(record, {k: v for k, v in fixed.items() if k not in ("locality_logprobs", "continuations")})
    return fixed


@torch.no_grad()
def _heldout_nll(model, tokenizer, settings: SuiteSettings, window: int = 256) -> tuple[float, int]:
    """Total NLL and token count of the held-out text, in windows of ``window`` tokens (each article apart)."""
    device = model_device(model)
    config = model.config
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    window = max(1, min(window, int(longest) - 1))
    total, count = 0.0, 0
    for article in suites.load("heldout").items:
        ids = tokenizer(article["text"], add_special_tokens=False)["input_ids"]
        ids = ids[: max(0, settings.heldout_tokens - count)]
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window + 1]], device=device)
            if chunk.shape[1] < 2:
                continue
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total += float(nll)
            count += chunk.shape[1] - 1
        if count >= settings.heldout_tokens:
            break
    return total, count


# ---------------------------------------------------------------------------------------------- before vs after
def _claim(protocol: str, suite: str, n: int, before: float | None, after: float | None) -> dict[str, Any]:
    source = suites.load(suite) if suite in suites.FILES else None
    return {"protocol": protocol, "suite": suite, "suite_sha256": source.sha256 if source else None, "n": n,
            "before": None if before is None else round(before, 6), "after": None if after is None else round(after, 6)}


def compare(base: Snapshot, edited: Snapshot) -> dict[str, dict[str, Any]]:
    """The side-effect claims: protocol, suite and its sha256, n, before, after."""
    def unchanged(a: list[str], b: list[str]) -> float | None:
        return sum(normalise(x) == normalise(y) for x, y in zip(a, b)) / len(a) if a else None

    claims = {
        "locality_unchanged": _claim("generate_match", "locality", len(base.locality), 1.0,
                                     unchanged(base.locality, edited.locality)),
        "same_subject_unchanged": _claim("generate_match", "relation_templates", len(base.same_subject),
                                         1.0 if base.same_subject else None,
                                         unchanged(base.same_subject, edited.same_subject)),
        "fluency": _claim("ngram_entropy", "generic_prompts", len(base.fluency), _mean(base.fluency),
                          _mean(edited.fluency)),
    }
    if base.locality_logprobs is not None and edited.locality_logprobs is not None:
        p = base.locality_logprobs
        kl = (p.exp() * (p - edited.locality_logprobs)).sum(-1).clamp(min=0)
        claims["locality_kl"] = _claim("next_token_kl", "locality", len(kl), 0.0, float(kl.mean()))
    if base.heldout_nll is not None and edited.heldout_nll is not None:
        (nll_a, n), (nll_b, _) = base.heldout_nll, edited.heldout_nll
        claims["perplexity"] = _claim("perplexity", "heldout", n, math.exp(nll_a / n), math.exp(nll_b / n))
    return claims


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def verdict(claims: dict[str, dict[str, Any]]) -> str:
    """One line on the side effects, e.g. "3 of 60 unrelated answers changed; perplexity +0.4 %"."""
    parts = []
    loc = claims.get("locality_unchanged")
    if loc and loc["after"] is not None:
        changed = round((1 - loc["after"]) * loc["n"])
        parts.append(f"{changed} of {loc['n']} unrelated answers changed")
    same = claims.get("same_subject_unchanged")
    if same and same["after"] is not None and same["n"]:
        changed = round((1 - same["after"]) * same["n"])
        parts.append(f"{changed} of {same['n']} answers about the edited subject under other relations changed")
    ppl = claims.get("perplexity")
    if ppl and ppl["before"]:
        change = round(100 * (ppl["after"] / ppl["before"] - 1), 1) + 0.0  # + 0.0: no "-0.0"
        parts.append(f"perplexity {change:+.1f} %")
    kl = claims.get("locality_kl")
    if kl and kl["after"] is not None:
        parts.append(f"mean next-token KL {kl['after']:.4f} nats")
    return "; ".join(parts) if parts else "no side effects measured"
