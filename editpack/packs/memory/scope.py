"""A memory pack's scope: which stored fact a prompt is about, if any (similarity threshold, calibration, the
subject named, the relation asked), over one or more memories."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ... import suites
from ...facts import Fact, normal_text
from ...relations import relation_of
from .encoder import SentenceEncoder


# ---------------------------------------------------------------------------------------------- scope
@dataclass
class Scope:
    """The scope classifier's settings: what calibration and lookup read. The ``serac`` method's config extends
    it (``editpack.methods.serac.SERACConfig``); a memory pack reads it back from its hyper-parameters."""

    #: Similarity threshold; ``None`` calibrates it on the facts' paraphrases and neighbourhood prompts.
    threshold: float | None = None
    max_false_positive_rate: float = 0.01
    min_threshold: float = 0.3
    default_threshold: float = 0.5
    #: In scope only if the prompt also names the fact's subject.
    require_subject: bool = True
    #: With ``require_subject``: out of scope when another relation's phrasing is nearer to the prompt than the
    #: fact's relation by more than this (cosine of subject-masked clauses); ``None`` checks the subject only.
    relation_margin: float | None = 0.2
    #: With ``require_subject``: a prompt's similarity to a fact is the higher of the whole prompt's and that of its
    #: clause naming the subject (:func:`subject_sentence`), so text before the question (a document, an earlier
    #: turn, CounterFact's paraphrases' unrelated prefixes) does not push it out of scope. On the first 100
    #: records of CounterFact's ROME-format file, 5 of 200 paraphrases were under the 0.3 threshold as whole
    #: prompts and none by their clause.
    sentence_similarity: bool = True

    @staticmethod
    def of(hyperparameters: dict[str, Any]) -> "Scope":
        """The scope a pack was made with (packs made before ``relation_margin`` existed checked the subject only,
        before ``sentence_similarity`` compared whole prompts)."""
        given = {k: hyperparameters[k] for k in Scope.__dataclass_fields__ if k in hyperparameters}
        return Scope(**{"relation_margin": None, "sentence_similarity": False, **given})


def calibrate(positives: Sequence[float], negatives: Sequence[float], cfg: Scope) -> float:
    """The lowest threshold whose false-positive rate on ``negatives`` is at most the configured rate."""
    if not negatives:
        return cfg.default_threshold
    ranked = sorted(negatives, reverse=True)
    allowed = int(cfg.max_false_positive_rate * len(ranked))
    edge = ranked[allowed] if allowed < len(ranked) else float("-inf")
    return round(max(cfg.min_threshold, edge + 1e-4), 4)


def calibrate_facts(encoder: SentenceEncoder, facts: Sequence[Fact], keys: torch.Tensor, cfg: Scope) -> float:
    """Calibrate on the facts' paraphrases (in scope) against their neighbourhood prompts (out of scope)."""
    probe = MemoryIndex([(None, facts, keys, 0.0, cfg)], encoder)
    positives = [probe.best(p)[1] for f in facts for p in f.paraphrases]
    negatives = [probe.best(p.prompt)[1] for f in facts for p in f.neighborhood]
    return calibrate([s for s in positives if s is not None], [s if s is not None else float("-inf")
                                                               for s in negatives], cfg)


# ---------------------------------------------------------------------------------------------- relations
MASK = "X"


def subject_sentence(prompt: str, subject: str) -> str:
    """The clause of ``prompt`` that names ``subject``: from the sentence break before its last mention to the end
    (the whole prompt when it does not name it)."""
    low, at = prompt.lower(), prompt.lower().rfind(subject.lower())
    if at < 0:
        return prompt
    cut = max(low.rfind(". ", 0, at), low.rfind("\n", 0, at), low.rfind("? ", 0, at), low.rfind("! ", 0, at))
    return prompt[cut + 1 :].strip() if cut >= 0 else prompt


def subject_clause(prompt: str, subject: str) -> str:
    """The clause of ``prompt`` that names ``subject`` (:func:`subject_sentence`), the subject replaced by a
    placeholder: what a prompt asks about its subject, without the subject or preamble."""
    clause = subject_sentence(prompt, subject)
    i = clause.lower().find(subject.lower())
    while i >= 0:
        clause = clause[:i] + MASK + clause[i + len(subject) :]
        i = clause.lower().find(subject.lower(), i + len(MASK))
    return clause


class RelationCheck:
    """Whether a prompt about a fact's subject asks the fact's relation (see the module's *relation-aware
    scope*): masked clauses against CounterFact's relation phrasings, embedded once per encoder."""

    def __init__(self, encoder: "SentenceEncoder") -> None:
        self.encoder = encoder
        templates = suites.load("relation_templates").items
        self.relations = list(templates)
        phrasings = [(r, p) for r, ps in templates.items() for p in ps]
        self.labels = torch.tensor([self.relations.index(r) for r, _ in phrasings])
        self.keys = encoder.encode([p.replace("{}", MASK) for _, p in phrasings])
        self._own: dict[str, torch.Tensor] = {}  # a fact's masked clause -> its embedding (the pack's facts)

    def _own_clauses(self, facts: Sequence[Fact]) -> torch.Tensor:
        """The facts' own masked clauses embedded, each once for the life of this check (a pack routes many
        prompts to the same facts)."""
        clauses = [subject_clause(f.text, f.subject) for f in facts]
        missing = list(dict.fromkeys(c for c in clauses if c not in self._own))
        if missing:
            self._own.update(zip(missing, self.encoder.encode(missing)))
        return torch.stack([self._own[c] for c in clauses])

    def margins(self, pairs: Sequence[tuple[str, Fact]]) -> torch.Tensor:
        """For each (prompt, fact): how much nearer another relation's phrasing is to the prompt than the fact's
        own relation (≤ 0: the fact's relation is nearest)."""
        if not pairs:
            return torch.zeros(0)
        asked = self.encoder.encode([subject_clause(p, f.subject) for p, f in pairs])
        own = self._own_clauses([f for _, f in pairs])
        sims = asked @ self.keys.T
        relation = self.labels[(own @ self.keys.T).argmax(1)]
        for k, (_, fact) in enumerate(pairs):
            given = relation_of(fact)
            if given in self.relations:
                relation[k] = self.relations.index(given)
        mine = self.labels[None, :] == relation[:, None]
        nearest_own = torch.maximum(sims.masked_fill(~mine, -2.0).max(1).values, (asked * own).sum(1))
        return sims.masked_fill(mine, -2.0).max(1).values - nearest_own


# ---------------------------------------------------------------------------------------------- lookup
class MemoryIndex:
    """Nearest stored fact for prompts, over one or more memories (searched in order; first match wins)."""

    def __init__(self, memories: list[tuple[Any, Sequence[Fact], torch.Tensor, float, Scope]],
                 encoder: SentenceEncoder, relations: RelationCheck | None = None) -> None:
        self.memories = memories
        self.encoder = encoder
        self._relations = relations

    @property
    def relations(self) -> RelationCheck:
        if self._relations is None:
            self._relations = RelationCheck(self.encoder)
        return self._relations

    def best(self, prompt: str) -> tuple[tuple[Any, Fact] | None, float | None]:
        (match,), (score,) = self.lookup([prompt], with_scores=True)
        return match, score

    def lookup(self, prompts: Sequence[str], with_scores: bool = False):
        """For each prompt, ``(memory, fact)`` when in scope, else ``None`` (and best scores)."""
        embedded = self.encoder.encode(prompts)
        matches: list[tuple[Any, Fact] | None] = [None] * len(prompts)
        scores: list[float | None] = [None] * len(prompts)
        for memory, facts, keys, threshold, scope in self.memories:
            if not len(facts):
                continue
            sims = embedded @ keys.T.to(embedded.dtype)
            if scope.require_subject:
                named = torch.tensor([[normal_text(f.subject) in normal_text(p) for f in facts] for p in prompts])
                where = named.nonzero().tolist()  # (prompt, fact) pairs that name the fact's subject
                if scope.sentence_similarity and where:
                    self._sentence_similarities(sims, where, prompts, facts, keys)
                if scope.relation_margin is not None and where:
                    margins = self.relations.margins([(prompts[i], facts[j]) for i, j in where])
                    for (i, j), margin in zip(where, margins.tolist()):
                        named[i, j] = margin <= scope.relation_margin
                sims = sims.masked_fill(~named, float("-inf"))
            best, index = sims.max(1)
            for i, (score, j) in enumerate(zip(best.tolist(), index.tolist())):
                if score == float("-inf"):
                    continue
                if scores[i] is None or score > scores[i]:
                    scores[i] = score
                if matches[i] is None and score >= threshold:
                    matches[i] = (memory, facts[j])
        return (matches, scores) if with_scores else matches

    def _sentence_similarities(self, sims: torch.Tensor, where: list[list[int]], prompts: Sequence[str],
                               facts: Sequence[Fact], keys: torch.Tensor) -> None:
        """Raise ``sims[i, j]`` for each ``(i, j)`` in ``where`` to the similarity of prompt i's clause naming fact
        j's subject where that is higher (``Scope.sentence_similarity``); each distinct clause that is not its
        whole prompt is embedded once."""
        clauses = [subject_sentence(prompts[i], facts[j].subject) for i, j in where]
        distinct = list(dict.fromkeys(c for c, (i, _) in zip(clauses, where) if c != prompts[i]))
        if not distinct:
            return
        embedded = dict(zip(distinct, self.encoder.encode(distinct)))
        for clause, (i, j) in zip(clauses, where):
            if clause in embedded:
                sims[i, j] = torch.maximum(sims[i, j], embedded[clause].to(sims.dtype) @ keys[j].to(sims.dtype))
