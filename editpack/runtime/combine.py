"""The rules for combining packs, shared by :func:`~editpack.runtime.apply.apply`, :func:`stack` and the exports:
no pack twice, conflicting facts refused (or the later pack winning), parents first, one base; and
:func:`stack`, which sums weight packs into one."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Iterable

from ..errors import PackConflictError, PackFormatError
from ..facts import Fact, fact_key, normal_text
from ..model.fingerprint import combine
from ..packs.artifact import Artifact
from ..packs.base_model import BaseModel
from ..packs.delta import WeightDelta
from ..packs.manifest import slug
from ..packs.weights import EditPack
from ..share.hub import resolve_pack

ON_CONFLICT = ("error", "later")


# ---------------------------------------------------------------------------------------------- checks
def as_packs(packs) -> list[EditPack]:
    items = packs if isinstance(packs, (list, tuple)) else [packs]
    out = [item if isinstance(item, Artifact) else _load(item) for item in items]
    if not out:
        raise PackFormatError("no pack given")
    return out


def _load(reference) -> EditPack:
    return resolve_pack(reference)


def _target(fact: Fact) -> str:
    return normal_text(fact.target_new)


@dataclass
class Conflict:
    """``later``'s fact sets the same thing as ``earlier``'s fact, to a different target."""

    earlier: EditPack
    earlier_fact: Fact
    later: EditPack
    later_fact: Fact

    def __str__(self) -> str:
        return (f"{self.earlier.ref} sets {self.earlier_fact.text!r} -> {self.earlier_fact.target_new!r}, "
                f"{self.later.ref} sets {self.later_fact.text!r} -> {self.later_fact.target_new!r}")


def find_conflicts(packs: Iterable[EditPack]) -> list[Conflict]:
    """Pairs of facts in different packs (earlier first) that set the same subject and relation differently."""
    seen: dict[tuple[str, str], tuple[EditPack, Fact]] = {}
    conflicts = []
    for pack in packs:
        for fact in pack.facts:
            key = fact_key(fact)
            if key in seen and seen[key][0] is not pack and _target(seen[key][1]) != _target(fact):
                conflicts.append(Conflict(seen[key][0], seen[key][1], pack, fact))
            seen[key] = (pack, fact)
    return conflicts


def check_distinct(packs: list[EditPack]) -> None:
    """Raise :class:`PackConflictError` when a pack comes twice (the same name and version, or the same content):
    applied, stacked or exported twice, its delta would count double."""
    seen: dict[Any, EditPack] = {}
    for pack in packs:
        for key in (("ref", pack.ref), ("content", pack.content_id)):
            if key in seen:
                other = seen[key]
                same = "is given twice" if other.ref == pack.ref else f"holds the same content as {other.ref}"
                raise PackConflictError(f"{pack.ref} {same} ({pack.content_id[:19]}…): its change would count twice; "
                                        "give each pack once")
            seen[key] = pack


def resolve_conflicts(packs: list[EditPack], on_conflict: str = "error") -> list[EditPack]:
    """The packs to keep, in order (the rules :func:`apply`, :func:`stack` and the exports share): no pack twice
    (:func:`check_distinct`); raises on conflicts, or (``"later"``) drops wholly overridden earlier packs."""
    if on_conflict not in ON_CONFLICT:
        raise ValueError(f"on_conflict must be one of {ON_CONFLICT}, not {on_conflict!r}")
    check_distinct(packs)
    conflicts = find_conflicts(packs)
    if not conflicts:
        return list(packs)
    if on_conflict == "error":
        listed = "; ".join(str(c) for c in conflicts[:5]) + (f"; … {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise PackConflictError(f"conflicting packs: {listed}. Pass on_conflict='later' (CLI: --later-wins) to "
                                "let the later pack win.")
    overridden: dict[int, set[int]] = {}
    for c in conflicts:
        overridden.setdefault(id(c.earlier), set()).add(id(c.earlier_fact))
    keep = []
    for pack in packs:
        hit = overridden.get(id(pack), set())
        if not hit:
            keep.append(pack)
        elif len(hit) == len(pack.facts):
            warnings.warn(f"{pack.ref} is left out: every fact in it is overridden by a later pack", stacklevel=3)
        else:
            kept = [f.text for f in pack.facts if id(f) not in hit]
            raise PackConflictError(
                f"{pack.ref} is only partly overridden by later packs (it also sets {kept[:3]}); a weight delta "
                "cannot drop single facts. Re-edit those facts into a new pack instead."
            )
    return keep


def check_parents(packs: list[EditPack], present: list[EditPack]) -> None:
    """Each pack's ``requires`` must be among ``present`` or earlier in ``packs`` (same name, version, content)."""
    available = {(p.name, p.version, p.content_id) for p in present}
    for pack in packs:
        for parent in pack.requires:
            if (parent["name"], parent["version"], parent.get("content")) not in available:
                raise PackConflictError(
                    f"pack {pack.ref} was made on top of {parent['name']}@{parent['version']} and only holds the "
                    f"change relative to it; apply {parent['name']}@{parent['version']} first (same content "
                    f"{str(parent.get('content'))[:19]}…)."
                )
        available.add((pack.name, pack.version, pack.content_id))


def check_stackable(packs: list[EditPack]) -> None:
    """Packs must share a base: same model type and, for modules they both edit, the same original weights."""
    first = packs[0]
    for pack in packs[1:]:
        if pack.base.model_type != first.base.model_type:
            raise PackConflictError(f"{first.ref} is for a {first.base.model_type} model, {pack.ref} for a "
                                    f"{pack.base.model_type} model: they cannot be combined")
        shared = set(first.modules) & set(pack.modules)
        a, b = first.base.modules or {}, pack.base.modules or {}
        differing = sorted(m for m in shared if a.get(m) != b.get(m)) if a and b else (
            sorted(shared) if shared and first.base.fingerprint != pack.base.fingerprint else [])
        if differing:
            raise PackConflictError(
                f"{first.ref} and {pack.ref} were made for different base weights of {', '.join(differing)} "
                f"({first.base.id} vs {pack.base.id}), facts {[f.text for f in first.facts[:2]]} and "
                f"{[f.text for f in pack.facts[:2]]}"
            )
        if pack.fan_in_fan_out != first.fan_in_fan_out:
            raise PackConflictError(f"{first.ref} and {pack.ref} disagree on weight orientation (fan_in_fan_out)")


def stack(packs, *, name: str | None = None, version: str = "1.0.0", on_conflict: str = "error") -> EditPack:
    """One pack whose delta is exactly the sum of ``packs``' deltas (factors concatenated, ranks add).

    Facts are the union (in order), the base is the shared base, and each input is recorded as a ``stacked``
    parent; parents the inputs were made on top of, and that are not themselves in the stack, carry over.
    """
    packs = as_packs(packs)
    kinds = sorted({p.kind for p in packs})
    if len(kinds) > 1:
        raise PackConflictError(f"packs of different kinds ({', '.join(kinds)}) cannot be stacked into one; apply "
                                "them together")
    if packs[0].hooks_modules:
        raise PackConflictError(f"{packs[0].kind} packs are not summed into one: apply them together "
                                "(editpack.apply with a list; each wraps its layer) or grow one with editpack.extend")
    packs = resolve_conflicts(packs, on_conflict)
    if not packs[0].holds_weights:  # memories stack by the union of their facts

        union = packs[0].with_facts(add=[f for p in packs[1:] for f in p.facts], version=version)
        return replace(union, name=name or slug(f"stack-{packs[0].name}-and-{len(packs) - 1}-more"),
                       parents=[p.lineage_record("stacked") for p in packs])
    check_stackable(packs)
    contents = {(p.name, p.version, p.content_id) for p in packs}
    delta = WeightDelta()
    modules: dict[str, str] = {}
    norms: dict[str, float] = {}
    for pack in packs:
        for module, part in sorted(pack.delta.modules.items()):
            delta.add(module, part)
        modules.update(pack.base.modules or {})
        norms.update(pack.base.norms or {})
    first = packs[0]
    requires = []
    for pack in packs:
        for parent in pack.requires:
            key = (parent["name"], parent["version"], parent.get("content"))
            if key not in contents and parent not in requires:
                requires.append(parent)

    methods = sorted({p.method for p in packs})
    base = BaseModel(**{**first.base.to_dict(), "modules": modules or None, "norms": norms or None,
                        "fingerprint": combine(modules) if modules else first.base.fingerprint})
    return EditPack(
        name=name or slug(f"stack-{first.name}-and-{len(packs) - 1}-more"),
        version=version,
        method=methods[0] if len(methods) == 1 else "stack",
        hyperparameters={"stacked": [{"name": p.name, "version": p.version, "method": p.method,
                                      "hyperparameters": p.hyperparameters} for p in packs]},
        facts=[f for p in packs for f in p.facts],
        base=base,
        delta=delta,
        fan_in_fan_out=first.fan_in_fan_out,
        parents=requires + [p.lineage_record("stacked") for p in packs],
    )


def check_mergeable(packs: Iterable[EditPack]) -> None:
    """Raise unless every pack can be folded into the weights (memory packs cannot)."""
    unmergeable = [p.ref for p in packs if not p.mergeable]
    if unmergeable:
        raise PackFormatError(f"{', '.join(unmergeable)} cannot be merged into a model folder (memory and codebook "
                              "packs leave the weights alone); use them unmerged: editpack generate --pack, editpack.apply or "
                              "editpack.pipeline")
