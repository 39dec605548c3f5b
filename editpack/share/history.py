"""A pack's history: its versions in order (:func:`log`) and what changed between two versions (:func:`diff`).

Versions are found where a pack lives:

- a Hub repository ``user/name``: every ``v<semver>`` tag (:func:`editpack.versions`), each pulled and verified;
- a local pack directory: the versions it ``extends``, found among the pack directories beside it (same name,
  version and content hash), oldest first, ending with the pack itself;
- a local folder of pack directories (one per version of one pack): all of them, by version.

Each entry says what the version changed: facts added, replaced (same subject and relation, another target) and
removed; what its payload holds (a weight pack's modules and ranks, a codebook's entries, a memory's facts); its
after-edit scores as its evaluation recorded them; and its size on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PackFormatError
from ..facts import Fact, fact_key, normal_text
from ..packs.artifact import Artifact, load_pack
from ..packs.manifest import MANIFEST, read_manifest
from .hub import parse_reference, pull, resolve_pack, versions

METRICS = ("reliability", "generalization", "locality")


@dataclass
class FactChanges:
    """Facts of a newer version against an older one, matched by subject and relation."""

    added: list[Fact] = field(default_factory=list)
    replaced: list[tuple[Fact, Fact]] = field(default_factory=list)  # (old, new)
    removed: list[Fact] = field(default_factory=list)

    @property
    def counts(self) -> str:
        return f"+{len(self.added)} ~{len(self.replaced)} -{len(self.removed)}"


def fact_changes(old: list[Fact], new: list[Fact]) -> FactChanges:
    """Every fact counted (a pack may hold several facts of one subject and relation, e.g. two phrasings of it):
    a fact in both (same subject, relation and target) is unchanged; of the others, facts about the same subject
    and relation pair up as replaced, in order, and the rest are added or removed."""
    def same(fact: Fact) -> tuple:
        return fact_key(fact), normal_text(fact.target_new)

    unmatched_old = list(old)
    fresh = []
    for fact in new:
        twin = next((i for i, o in enumerate(unmatched_old) if same(o) == same(fact)), None)
        if twin is None:
            fresh.append(fact)
        else:
            del unmatched_old[twin]
    changes = FactChanges()
    for fact in fresh:
        earlier = next((i for i, o in enumerate(unmatched_old) if fact_key(o) == fact_key(fact)), None)
        if earlier is None:
            changes.added.append(fact)
        else:
            changes.replaced.append((unmatched_old.pop(earlier), fact))
    changes.removed = unmatched_old
    return changes


def scores(pack: Artifact) -> dict[str, dict[str, float]]:
    """``{protocol: {metric: after-edit score}}`` from the pack's recorded evaluation (empty if none)."""
    out: dict[str, dict[str, float]] = {}
    for protocol, metrics in ((pack.evaluation or {}).get("protocols") or {}).items():
        for metric in METRICS:
            row = (metrics or {}).get(metric)
            if row and row.get("n") and row.get("after") is not None:
                out.setdefault(protocol, {})[metric] = float(row["after"])
    return out


def size_bytes(pack: Artifact) -> int | None:
    """Bytes of the pack's files on disk (``None`` for a pack only in memory)."""
    if pack.path is None:
        return None
    names = [MANIFEST, *pack.files]
    return sum((Path(pack.path) / n).stat().st_size for n in names if (Path(pack.path) / n).is_file())


@dataclass
class LogEntry:
    pack: Artifact
    changes: FactChanges  # against the previous entry (everything added for the first)
    parts: dict[str, str]
    scores: dict[str, dict[str, float]]
    size: int | None

    def to_dict(self) -> dict[str, Any]:
        p = self.pack
        return {"name": p.name, "version": p.version, "created": p.created, "kind": p.kind, "method": p.method,
                "facts": len(p.facts), "added": len(self.changes.added), "replaced": len(self.changes.replaced),
                "removed": len(self.changes.removed), "parts": self.parts, "scores": self.scores,
                "size_bytes": self.size, "content": p.content_id}

    def line(self) -> str:
        p = self.pack
        shown = ", ".join(f"{proto} " + "/".join(f"{v:.2f}" for v in m.values()) for proto, m in self.scores.items())
        payload = "; ".join(f"{k} {v}" for k, v in self.parts.items()) if len(self.parts) <= 3 else (
            f"{len(self.parts)} modules ({', '.join(sorted(set(self.parts.values())))})")
        return (f"{p.version:<10} {p.created[:19]:<19} {p.method:<10} {len(p.facts):>6} facts "
                f"({self.changes.counts})  {payload}"
                + (f"  {_size(self.size)}" if self.size is not None else "")
                + (f"  scores {shown}" if shown else ""))


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _version_key(version: str) -> tuple:
    core, _, pre = version.partition("-")
    return tuple(int(x) for x in core.split(".")) + ((1,) if not pre else (0, pre))


def _packs_in(folder: Path) -> list[Artifact]:
    found = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and (child / MANIFEST).is_file():
            try:
                read_manifest(child)
            except PackFormatError:
                continue
            found.append(load_pack(child))
    return found


def history(reference: Any, *, token: str | None = None, endpoint: str | None = None) -> list[Artifact]:
    """The versions of a pack, oldest first (see the module docstring for where they are looked for)."""
    if isinstance(reference, Artifact):
        return _lineage(reference)
    path = Path(str(reference))
    if path.is_dir() and (path / MANIFEST).exists():
        return _lineage(load_pack(path))
    if path.is_dir():
        packs = _packs_in(path)
        if not packs:
            raise PackFormatError(f"{path} holds no pack directories")
        names = sorted({p.name for p in packs})
        if len(names) > 1:
            raise PackFormatError(f"{path} holds packs of several names ({', '.join(names)}); name one pack directory")
        return sorted(packs, key=lambda p: (_version_key(p.version), p.created))  # equal versions: oldest first
    hub = parse_reference(str(reference))
    if hub is None:
        raise PackFormatError(f"{reference!r} is neither a pack directory, a folder of packs nor a Hub repository")
    if hub.revision:
        return _lineage(pull(str(reference), token=token, endpoint=endpoint), token=token, endpoint=endpoint)
    return [pull(f"{hub.repo_id}@{v.version}", token=token, endpoint=endpoint)
            for v in versions(hub.repo_id, token=token, endpoint=endpoint)]


def _lineage(pack: Artifact, *, token: str | None = None, endpoint: str | None = None) -> list[Artifact]:
    """``pack`` and the versions it extends, found beside it (or on the Hub for a pulled pack), oldest first."""
    siblings = _packs_in(Path(pack.path).parent) if pack.path is not None and pack.source is None else []
    chain = [pack]
    while True:
        parent = next((p for p in chain[-1].parents if p.get("relation") == "extends"), None)
        if parent is None:
            break
        match = next((s for s in siblings if (s.name, s.version, s.content_id) ==
                      (parent["name"], parent["version"], parent.get("content"))), None)
        if match is None and pack.source is not None:
            hub = parse_reference(pack.source)
            match = pull(f"{hub.repo_id}@{parent['version']}", token=token, endpoint=endpoint)
            if match.content_id != parent.get("content"):
                match = None
        if match is None:
            break
        chain.append(match)
    return chain[::-1]


def log(reference: Any, **hub: Any) -> list[LogEntry]:
    """:func:`history` with what each version changed, holds and scored."""
    entries, previous = [], []
    for pack in history(reference, **hub):
        entries.append(LogEntry(pack, fact_changes(previous, pack.facts), pack.parts(), scores(pack), size_bytes(pack)))
        previous = pack.facts
    return entries


@dataclass
class PackDiff:
    a: Artifact
    b: Artifact
    changes: FactChanges
    parts: list[str]
    settings: list[str]
    scores: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a.ref, "b": self.b.ref, "kinds": [self.a.kind, self.b.kind],
                "methods": [self.a.method, self.b.method],
                "added": [f.to_dict() for f in self.changes.added],
                "replaced": [{"old": o.to_dict(), "new": n.to_dict()} for o, n in self.changes.replaced],
                "removed": [f.to_dict() for f in self.changes.removed],
                "parts": self.parts, "settings": self.settings, "scores": self.scores}

    def lines(self) -> list[str]:
        a, b = self.a, self.b
        out = [f"{a.ref} → {b.ref}" + (f" ({a.kind} → {b.kind})" if a.kind != b.kind else f" ({a.kind})")]
        if a.method != b.method:
            out.append(f"method: {a.method} → {b.method}")
        out.append(f"facts: {len(a.facts)} → {len(b.facts)} ({self.changes.counts})")
        out += [f"  + {f.text!r} → {f.target_new!r}" for f in self.changes.added[:20]]
        if len(self.changes.added) > 20:
            out.append(f"  + … {len(self.changes.added) - 20} more")
        out += [f"  ~ {new.text!r}: {old.target_new!r} → {new.target_new!r}" for old, new in self.changes.replaced]
        out += [f"  - {f.text!r} → {f.target_new!r}" for f in self.changes.removed]
        out += [("payload: " + line) for line in self.parts] or ["payload: unchanged"]
        out += [("setting: " + line) for line in self.settings]
        out += [("score: " + line) for line in self.scores]
        return out


def diff(a: Any, b: Any, **hub: Any) -> PackDiff:
    """What changed from pack ``a`` to pack ``b`` (directories, ``user/name@version`` or pack objects)."""
    a, b = resolve_pack(a, **hub), resolve_pack(b, **hub)
    if a.base.model_type != b.base.model_type:
        raise PackFormatError(f"{a.ref} is for a {a.base.model_type} model and {b.ref} for a {b.base.model_type} "
                              "model: there is nothing to compare")
    pa, pb = a.parts(), b.parts()
    parts = [f"{m}: {pa[m]} → {pb[m]}" for m in sorted(set(pa) & set(pb)) if pa[m] != pb[m]]
    parts += [f"{m}: added ({pb[m]})" for m in sorted(set(pb) - set(pa))]
    parts += [f"{m}: removed (was {pa[m]})" for m in sorted(set(pa) - set(pb))]
    ha, hb = a.hyperparameters, b.hyperparameters
    settings = [f"{k}: {_short(ha.get(k))} → {_short(hb.get(k))}" for k in sorted(set(ha) | set(hb))
                if ha.get(k) != hb.get(k)]
    sa, sb = scores(a), scores(b)
    lines = []
    for protocol in sorted(set(sa) | set(sb)):
        for metric in METRICS:
            x, y = sa.get(protocol, {}).get(metric), sb.get(protocol, {}).get(metric)
            if x is None and y is None:
                continue
            change = f" ({(y - x) * 100:+.1f} points)" if x is not None and y is not None else ""
            lines.append(f"{protocol} {metric}: {_score(x)} → {_score(y)}{change}")
    return PackDiff(a, b, fact_changes(a.facts, b.facts), parts, settings, lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def _score(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
