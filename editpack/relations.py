"""What editpack knows of a fact's relation: CounterFact's phrasings of 34 Wikidata relations
(``editpack/suites/relation_templates.json``), which of them a fact's prompt is, the other phrasings of it
(template paraphrases) and the fact's subject under other relations."""

from __future__ import annotations

import hashlib
import re

from . import suites
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


def template_paraphrases(fact: Fact) -> list[str]:
    """Other CounterFact phrasings of the fact's relation, filled with its subject (empty when unknown)."""
    relation = relation_of(fact)
    if relation is None:
        return []
    phrasings = suites.load("relation_templates").items[relation]
    own = normal_text(fact.prompt)
    return [p.replace("{}", fact.subject) for p in phrasings if normal_text(p) != own]


def same_subject_prompts(fact: Fact, count: int) -> list[str]:
    """The fact's subject under ``count`` other relations (chosen by a stable hash of the subject), leaving out
    the fact's own relation and phrasings that share most of their words with its prompt."""
    templates = suites.load("relation_templates").items
    own_relation = relation_of(fact)
    own_words = _content_words(fact.prompt)
    ranked = sorted(templates, key=lambda r: hashlib.sha256(f"{fact.subject}|{r}".encode()).hexdigest())
    prompts = []
    for relation in ranked:
        if relation == own_relation:
            continue
        phrasing = templates[relation][0]
        words = _content_words(phrasing)
        if words and len(words & own_words) * 2 >= len(words):
            continue  # too close to the edited relation's own wording
        prompts.append(phrasing.replace("{}", fact.subject))
        if len(prompts) == count:
            break
    return prompts
