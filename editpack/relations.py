"""What editpack knows of a fact's relation: CounterFact's phrasings of 34 Wikidata relations
(``editpack/suites/relation_templates.json``), which of them a fact's prompt is, the other phrasings of it
and the fact's subject under other relations.

The other phrasings of the fact's own relation are split the same way: :func:`template_paraphrases` measure
generalization where a fact gives no paraphrases, and :func:`training_paraphrases` (the others, or with
paraphrases given, any not among them) are what a locate-then-edit method may rewrite under
(``paraphrase_prompts``).

The subject under other relations is asked in two disjoint sets of phrasings: :func:`same_subject_prompts` (each
relation's first phrasing) measures relation specificity on cards and in benchmarks, and
:func:`retention_prompts` (the other phrasings, none of them a first phrasing) is what locate-then-edit methods
keep unchanged while they edit (``retain_factor``), so what is measured is never what was optimised."""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

from . import suites
from .chat import ChatFrame, plain_fact
from .facts import Fact, normal_text

_STOP = {"the", "a", "an", "of", "in", "is", "was", "to", "by", "for", "on", "at", "and", "which", "what", "who",
         "that", "its", "it", "as", "with", "from", "be", "are", "were", "has", "had", "{}"}


# ---------------------------------------------------------------------------------------------- probes from templates
def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z{}]+", text.lower()) if w not in _STOP}


def relation_of(fact: Fact) -> str | None:
    """The fact's Wikidata relation id: given, or found when its prompt is one of CounterFact's phrasings."""
    templates = suites.load("relation_templates").items
    if fact.relation in templates:
        return fact.relation
    for relation, phrasings in templates.items():
        if any(normal_text(p) == normal_text(fact.prompt) for p in phrasings):
            return relation
    return None


def _own_phrasings(fact: Fact) -> list[str]:
    """The fact's relation's CounterFact phrasings but its prompt's own (templates with ``{}``)."""
    relation = relation_of(fact)
    if relation is None:
        return []
    own = normal_text(fact.prompt)
    return [p for p in suites.load("relation_templates").items[relation] if normal_text(p) != own]


def template_paraphrases(fact: Fact) -> list[str]:
    """The phrasings of the fact's relation that measure generalization where the fact gives no paraphrases:
    every other one of its relation's other CounterFact phrasings (the first, third, …), filled with its subject
    (empty when the relation is unknown). The rest are :func:`training_paraphrases`'."""
    return [p.replace("{}", fact.subject) for p in _own_phrasings(fact)[0::2]]


def training_paraphrases(fact: Fact, count: int) -> list[str]:
    """Up to ``count`` phrasings of the fact's relation (templates with ``{}``) that an edit may be optimised
    over, never one that measures it: with paraphrases given, the relation's other phrasings but those equal to
    one of them; without, the ones :func:`template_paraphrases` leaves (the second, fourth, …)."""
    phrasings = _own_phrasings(fact)
    if fact.paraphrases:
        measured = {normal_text(p) for p in fact.paraphrases}
        chosen = [p for p in phrasings if normal_text(p.replace("{}", fact.subject)) not in measured]
    else:
        chosen = phrasings[1::2]
    return chosen[:count]


def _other_relations(fact: Fact, own: str | None, salt: str) -> list[str]:
    """The relations but ``own`` (the fact's), in an order fixed by a hash of the fact's subject (and ``salt``)."""
    templates = suites.load("relation_templates").items
    return sorted((r for r in templates if r != own),
                  key=lambda r: hashlib.sha256(f"{salt}{fact.subject}|{r}".encode()).hexdigest())


class _OwnWording:
    """The fact's prompt and its relation's phrasings: what a phrasing of another relation must not resemble
    (the edited relation in other words; CounterFact phrases some relations alike)."""

    def __init__(self, fact: Fact, own: str | None):
        texts = [fact.prompt, *(suites.load("relation_templates").items[own] if own else [])]
        self.normal = {normal_text(t) for t in texts}
        self.words = [_content_words(t) for t in texts]

    def close_to(self, phrasing: str) -> bool:
        """Whether ``phrasing`` is one of them, or shares most of its words with one."""
        words = _content_words(phrasing)
        return normal_text(phrasing) in self.normal or bool(words) and any(
            len(words & own) * 2 >= len(words) for own in self.words)


def same_subject_prompts(fact: Fact, count: int) -> list[str]:
    """The fact's subject under ``count`` other relations (chosen by a stable hash of the subject), each in its
    relation's first phrasing, leaving out the fact's own relation and phrasings that share most of their words
    with its prompt or one of its relation's phrasings."""
    templates = suites.load("relation_templates").items
    own = relation_of(fact)
    wording = _OwnWording(fact, own)
    prompts = []
    for relation in _other_relations(fact, own, ""):
        phrasing = templates[relation][0]
        if wording.close_to(phrasing):
            continue  # too close to the edited relation's own wording
        prompts.append(phrasing.replace("{}", fact.subject))
        if len(prompts) == count:
            break
    return prompts


def retention_prompts(fact: Fact, count: int) -> list[str]:
    """Up to ``count`` templates (one ``{}`` for the subject) of other relations than the fact's, never one that
    :func:`same_subject_prompts` asks: each relation's second and later phrasings that are no relation's first,
    one per relation in a hashed order of their own, then more per relation while ``count`` asks for them. A fact
    in chat form is a plain fact here; :func:`subject_prompts_in_form` frames the result."""
    templates = suites.load("relation_templates").items
    own = relation_of(fact)
    wording = _OwnWording(fact, own)
    measured = {normal_text(p[0]) for p in templates.values()}
    pools = [[p for p in templates[r][1:] if normal_text(p) not in measured and not wording.close_to(p)]
             for r in _other_relations(fact, own, "retain|")]
    out: list[str] = []
    taken: set[str] = set()
    for depth in range(max(map(len, pools), default=0)):
        for pool in pools:
            if depth < len(pool) and len(out) < count and normal_text(pool[depth]) not in taken:
                out.append(pool[depth])
                taken.add(normal_text(pool[depth]))
    return out


def subject_prompts_in_form(tokenizer, facts: Sequence[Fact], count: int, *,
                            retention: bool = False) -> list[list[str]]:
    """:func:`same_subject_prompts` (or, with ``retention``, :func:`retention_prompts`, as templates) of each
    fact in its own form: for a fact in ``tokenizer``'s chat form, the user's turns in that form."""
    return _in_form(tokenizer, facts, retention_prompts if retention else same_subject_prompts, count)


def training_paraphrases_in_form(tokenizer, facts: Sequence[Fact], count: int) -> list[list[str]]:
    """:func:`training_paraphrases` of each fact (templates) in its own form, as :func:`subject_prompts_in_form`."""
    return _in_form(tokenizer, facts, training_paraphrases, count)


def _in_form(tokenizer, facts: Sequence[Fact], prompts_of, count: int) -> list[list[str]]:
    frame = ChatFrame.of(tokenizer) if tokenizer is not None else None
    out = []
    for fact in facts:
        plain = plain_fact(frame, fact)
        prompts = prompts_of(plain, count)
        out.append([frame.wrap(p) for p in prompts] if frame is not None and plain.prompt != fact.prompt else prompts)
    return out
