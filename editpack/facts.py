"""Facts: what an edit asks the model to believe, and readers for the common dataset formats.

A :class:`Fact` is ``prompt`` (a template with ``{}`` where the subject goes), ``subject``, ``target_new``,
optionally ``target_true``, ``paraphrases``, ``neighborhood`` and ``portability`` probes (prompt + expected
answer). A prompt given with the subject spelled out is turned into a template. Invalid records are rejected
with an :class:`~editpack.errors.InvalidFactError` that names the record and the problem.

Readers take native JSON/JSONL/YAML files, CounterFact (EasyEdit's flattened form and ROME's schema), zsRE in
MEND's format and MQuAKE. ``load_facts("counterfact:PATH")`` forces a format; without a prefix it is detected from
the first record's keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from .errors import InvalidFactError


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer the model is expected to give to it."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Fact:
    """One edit request (see the module docstring)."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    relation: str | None = None
    id: str | None = None

    @property
    def text(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["paraphrases"] = list(self.paraphrases)
        data["neighborhood"] = [asdict(p) for p in self.neighborhood]
        data["portability"] = [asdict(p) for p in self.portability]
        return {k: v for k, v in data.items() if v not in (None, [], ())}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "fact") -> "Fact":
        """Build a fact from editpack's own field names; unknown fields are an error."""
        if not isinstance(data, dict):
            raise InvalidFactError(f"{where}: expected an object with prompt/subject/target_new, got {type(data).__name__}")
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise InvalidFactError(f"{where}: field names must be text, not {bad_keys[0]!r}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidFactError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: "
                                   f"{', '.join(cls.__dataclass_fields__)})")
        return make_fact(
            prompt=data.get("prompt"),
            subject=data.get("subject"),
            target_new=data.get("target_new"),
            target_true=data.get("target_true"),
            paraphrases=data.get("paraphrases") or (),
            neighborhood=data.get("neighborhood") or (),
            portability=data.get("portability") or (),
            relation=data.get("relation"),
            id=data.get("id"),
            where=where,
        )


def _probe(item: Any, where: str) -> Probe:
    if isinstance(item, Probe):
        return item
    if isinstance(item, dict) and set(item) == {"prompt", "answer"}:
        return Probe(str(item["prompt"]), str(item["answer"]))
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return Probe(str(item[0]), str(item[1]))
    raise InvalidFactError(f"{where}: a probe must be {{prompt, answer}} or [prompt, answer], got {item!r}")


def make_fact(
    prompt: Any,
    subject: Any,
    target_new: Any,
    target_true: Any = None,
    paraphrases: Iterable[str] = (),
    neighborhood: Iterable[Any] = (),
    portability: Iterable[Any] = (),
    relation: str | None = None,
    id: Any = None,
    where: str = "fact",
) -> Fact:
    """Validate and normalise one fact (the subject spelled out in ``prompt`` becomes ``{}``)."""
    for name, value in (("prompt", prompt), ("subject", subject), ("target_new", target_new)):
        if value is not None and not isinstance(value, str):
            raise InvalidFactError(f"{where}: {name} must be text, not {type(value).__name__} {value!r:.60}")
        if value is None or not value.strip():
            raise InvalidFactError(f"{where}: {name} is missing or empty")
    subject = subject.strip()
    if prompt.count("{}") > 1:
        raise InvalidFactError(f"{where}: prompt {prompt!r} has more than one {{}} placeholder")
    if "{}" not in prompt:
        if subject not in prompt:
            raise InvalidFactError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}")
        start = prompt.index(subject)
        prompt = prompt[:start] + "{}" + prompt[start + len(subject) :]
    if target_true is not None and not isinstance(target_true, str):
        raise InvalidFactError(f"{where}: target_true must be text, not {type(target_true).__name__} "
                               f"{target_true!r:.60}")
    if target_true is not None and not target_true.strip():
        target_true = None
    target_new = target_new.strip()
    if target_true is not None:
        target_true = target_true.strip()
        if target_true.casefold() == target_new.casefold():
            raise InvalidFactError(f"{where}: target_new {target_new!r} equals the true answer; nothing to edit")
    for name, values in (("paraphrases", paraphrases), ("neighborhood", neighborhood), ("portability", portability)):
        if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
            raise InvalidFactError(f"{where}: {name} must be a list, not {type(values).__name__} {values!r:.60}")
    if any(not isinstance(p, str) for p in paraphrases):
        raise InvalidFactError(f"{where}: paraphrases must be a list of texts")
    paraphrases = tuple(p for p in paraphrases if p.strip())
    return Fact(
        prompt=prompt.lstrip().rstrip(" \t"),  # a line break ending it stays: chat templates end so
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrases=paraphrases,
        neighborhood=tuple(_probe(p, where) for p in neighborhood),
        portability=tuple(_probe(p, where) for p in portability),
        relation=relation,
        id=None if id is None else str(id),
    )


def normal_text(text: str) -> str:
    """``text`` case-folded with its whitespace collapsed: how facts, subjects and answers are compared."""
    return " ".join(text.casefold().split())


def fact_key(fact: Fact) -> tuple[str, str]:
    """What a fact is about: its subject and relation (or, without a relation id, its prompt)."""
    subject = normal_text(fact.subject)
    if fact.relation:
        return subject, "relation:" + fact.relation
    return subject, "prompt:" + normal_text(fact.text)


def check_consistent(facts: Sequence[Fact], where: str = "facts") -> None:
    """Raise :class:`InvalidFactError` when two of ``facts`` set the same thing (:func:`fact_key`) to different
    targets: an edit cannot hold both, and keeping the last would drop the other silently."""
    seen: dict[tuple[str, str], tuple[int, Fact]] = {}
    for index, fact in enumerate(facts):
        key = fact_key(fact)
        if key in seen and normal_text(seen[key][1].target_new) != normal_text(fact.target_new):
            first, other = seen[key]
            raise InvalidFactError(
                f"{where}: facts {first} and {index} contradict each other: {other.text!r} -> {other.target_new!r} "
                f"and {fact.text!r} -> {fact.target_new!r} (same subject and "
                f"{'relation' if fact.relation else 'prompt'}); keep one of them")
        seen.setdefault(key, (index, fact))


def kept_indices(existing: Sequence[Fact], replacing: Iterable[Fact]) -> list[int]:
    """Indices of ``existing`` facts that stay when ``replacing`` arrive: those about another subject and relation
    (:func:`fact_key`); a newer fact about the same ones replaces the older."""
    replaced = {fact_key(f) for f in replacing}
    return [i for i, f in enumerate(existing) if fact_key(f) not in replaced]


# -------------------------------------------------------------------------------------------- dataset schemas
def _from_counterfact_flat(r: dict, where: str) -> Fact:
    neighborhood = [(r["locality_prompt"], r["locality_ground_truth"])] if r.get("locality_prompt") else []
    return make_fact(r.get("prompt"), r.get("subject"), r.get("target_new"), r.get("ground_truth"),
                     paraphrases=[r["rephrase_prompt"]] if r.get("rephrase_prompt") else [],
                     neighborhood=neighborhood, id=r.get("case_id"), where=where)


def _from_counterfact_rome(r: dict, where: str) -> Fact:
    rw = r.get("requested_rewrite") or {}
    true = (rw.get("target_true") or {}).get("str")
    return make_fact(rw.get("prompt"), rw.get("subject"), (rw.get("target_new") or {}).get("str"), true,
                     paraphrases=r.get("paraphrase_prompts") or [],
                     neighborhood=[(p, true) for p in r.get("neighborhood_prompts") or []] if true else [],
                     relation=rw.get("relation_id"), id=r.get("case_id"), where=where)


def _from_zsre(r: dict, where: str) -> Fact:
    answers = r.get("answers") or []
    loc = r.get("loc") or ""
    loc = loc[len("nq question: "):] if loc.startswith("nq question: ") else loc
    neighborhood = [(loc, r["loc_ans"])] if loc and r.get("loc_ans") else []
    return make_fact(r.get("src"), r.get("subject"), r.get("alt"), answers[0] if answers else None,
                     paraphrases=[r["rephrase"]] if r.get("rephrase") else [], neighborhood=neighborhood,
                     id=r.get("case_id"), where=where)


def _from_mquake(r: dict, where: str) -> list[Fact]:
    """One fact per requested rewrite; the multi-hop questions become portability probes of the last one."""
    rewrites = r.get("requested_rewrite") or []
    if not rewrites:
        raise InvalidFactError(f"{where}: MQuAKE record has no requested_rewrite")
    facts = []
    portability = [(q, r["new_answer"]) for q in r.get("questions") or []] if r.get("new_answer") else []
    for i, rw in enumerate(rewrites):
        facts.append(make_fact(rw.get("prompt"), rw.get("subject"), (rw.get("target_new") or {}).get("str"),
                               (rw.get("target_true") or {}).get("str"),
                               paraphrases=[rw["question"]] if rw.get("question") else [],
                               portability=portability if i == len(rewrites) - 1 else [],
                               relation=rw.get("relation_id"), id=f"{r.get('case_id', '?')}.{i}",
                               where=f"{where} rewrite {i}"))
    return facts


FORMATS = ("native", "counterfact", "zsre", "mquake")


def detect_format(record: dict) -> str:
    if "requested_rewrite" in record and "questions" in record:
        return "mquake"
    if "requested_rewrite" in record or "ground_truth" in record and "rephrase_prompt" in record:
        return "counterfact"
    if "src" in record and "alt" in record:
        return "zsre"
    return "native"


def _convert(record: Any, kind: str, where: str) -> list[Fact]:
    if not isinstance(record, dict):
        raise InvalidFactError(f"{where}: expected an object, got {type(record).__name__}")
    kind = detect_format(record) if kind == "auto" else kind
    if kind == "native":
        return [Fact.from_dict(record, where)]
    if kind == "counterfact":
        reader = _from_counterfact_rome if "requested_rewrite" in record else _from_counterfact_flat
        return [reader(record, where)]
    if kind == "zsre":
        return [_from_zsre(record, where)]
    return _from_mquake(record, where)


def facts_from_records(
    records: Sequence[Any], fmt: str = "auto", source: str = "facts", skip_invalid: bool = False
) -> list[Fact]:
    """Convert raw records (dicts) of format ``fmt`` (or detected) into validated facts.

    By default the first invalid record raises. Benchmarks pass ``skip_invalid=True`` to drop records that
    cannot be edited (zsRE has a few whose new answer equals the old); ``skipped`` on the result counts them.
    """
    if fmt not in FORMATS + ("auto",):
        raise InvalidFactError(f"unknown facts format {fmt!r}; use one of {', '.join(FORMATS)}")
    facts = FactList()
    for index, record in enumerate(records):
        try:
            facts.extend(_convert(record, fmt, f"{source} record {index}"))
        except InvalidFactError as exc:
            if not skip_invalid:
                raise
            facts.skipped.append(str(exc))
    return facts


class FactList(list):
    """A list of facts that also remembers the records skipped as invalid (``skipped``: their messages)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.skipped: list[str] = []


def read_records(path: str | Path) -> list[Any]:
    """Raw records from a .json (list or one object), .jsonl or .yaml/.yml file."""
    path = Path(path)
    if path.is_dir():
        raise InvalidFactError(f"facts file {path} is a directory; give a JSON, JSONL or YAML file")
    if path.exists() and not path.is_file():
        raise InvalidFactError(f"facts file {path} is not a regular file (a device, a pipe or a socket); give a "
                               "JSON, JSONL or YAML file")
    if not path.exists():
        raise InvalidFactError(f"facts file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidFactError(f"{path}: not UTF-8 text (byte {exc.start}); save the facts file as UTF-8") from None
    except OSError as exc:
        raise InvalidFactError(f"{path}: cannot be read: {exc.strerror}") from None
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InvalidFactError(f"{path} line {number}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    elif path.suffix in (".yaml", ".yml"):

        try:
            records = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidFactError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidFactError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise InvalidFactError(f"{path}: expected a list of fact records")
    return records


def split_format(spec: str | Path) -> tuple[str, str]:
    """``[format:]PATH`` as ``(format or "auto", PATH)``; an unknown ``format:`` prefix on a path that does not
    exist as written is an error naming the formats (a file whose name holds a colon is still read)."""
    text = str(spec)
    head, sep, rest = text.partition(":")
    if not sep or Path(text).exists():
        return "auto", text
    if head in FORMATS:
        return head, rest
    if head.isidentifier() and len(head) > 1:  # not a Windows drive letter
        raise InvalidFactError(f"unknown facts format {head!r} in {text!r}; use one of {', '.join(FORMATS)} "
                               "(FORMAT:FILE), or a file name alone to detect the format")
    return "auto", text


def load_facts(
    spec: str | Path, limit: int | None = None, offset: int = 0, skip_invalid: bool = False
) -> list[Fact]:
    """Facts from ``[format:]PATH`` (format one of native, counterfact, zsre, mquake; detected if omitted).

    ``offset``/``limit`` select records before conversion (an MQuAKE record yields several facts).
    """
    fmt, text = split_format(spec)
    records = read_records(text)
    if offset or limit is not None:
        records = records[offset : None if limit is None else offset + limit]
    facts = facts_from_records(records, fmt, source=Path(text).name, skip_invalid=skip_invalid)
    if not facts:
        raise InvalidFactError(f"{text}: no facts found")
    return facts
