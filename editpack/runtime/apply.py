"""Putting packs on models, stacking them, and taking them off again.

``apply(model, packs)`` adds each pack as its own named PEFT LoRA adapter (unmerged: the base weights stay
untouched, and each adapter can be listed, switched off and removed), or with ``merge=True`` folds them into the
weights after keeping a copy of the original weights of the touched modules. ``revert(model)`` undoes all of it,
restoring the original weights bit for bit.

Before anything changes, every pack is checked against the model and against the others:

- its base fingerprint must match the model's original weights of the modules it edits (bitsandbytes-quantized
  weights cannot be hashed exactly; there the embedding fingerprint and the shapes are compared instead);
- a pack computed on top of other packs (``pack.requires``) needs those applied first;
- two packs that set the same fact (subject and relation, or subject and prompt) to different targets conflict.
  With ``on_conflict="later"`` the later pack wins: an earlier pack all of whose facts are overridden is left
  out (or taken off). A weight delta cannot drop single facts, so a partial override is refused.

The list of applied packs is kept on the transformers model itself (not in a global), see :func:`applied`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ..errors import FingerprintMismatchError, PackConflictError, PackFormatError
from ..facts import Fact, fact_key, normal_text
from ..model.fingerprint import (
    ORIGINALS, base_weight, is_quantized, memory_wrapper, module_fingerprints, unwrap, memo_fingerprint,
    weight_norms
)
from ..packs.artifact import Artifact
from ..packs.weights import EditPack, check_delta_scale

_RECORDS = "_editpack_records"  # list[AppliedPack] on the transformers model
_WRAPPER = "_editpack_peft_model"  # the PeftModel wrapping it, so revert() works from either object
ON_CONFLICT = ("error", "later")


@dataclass
class AppliedPack:
    """One pack on a model: its adapter name (``None`` once merged) and whether it is switched on."""

    pack: EditPack
    adapter: str | None
    merged: bool = False
    enabled: bool = True
    memory: bool = False  # a memory pack, consulted by the MemoryModel wrapper
    hook: Any = None  # a codebook's forward hook on the layer it wraps (``editpack.codebook.CodebookHook``)

    @property
    def name(self) -> str:
        return self.pack.name

    @property
    def version(self) -> str:
        return self.pack.version

    def matches(self, key: str) -> bool:
        return key in (self.pack.name, self.pack.ref, self.adapter)

    def __repr__(self) -> str:
        state = "merged" if self.merged else ("on" if self.enabled else "off") + (
            ", memory" if self.memory else ", hook" if self.hook is not None else "")
        return f"AppliedPack({self.pack.ref}, {state})"


# ---------------------------------------------------------------------------------------------- checks
def _as_packs(packs) -> list[EditPack]:
    items = packs if isinstance(packs, (list, tuple)) else [packs]
    out = [item if isinstance(item, Artifact) else _load(item) for item in items]
    if not out:
        raise PackFormatError("no pack given")
    return out


def _load(reference) -> EditPack:
    from ..share.hub import resolve_pack  # local directory or user/name@version on the Hub

    return resolve_pack(reference)


def check_fingerprint(model: torch.nn.Module, pack: EditPack) -> None:
    """Raise :class:`FingerprintMismatchError` unless ``model`` has the weights ``pack`` was made for."""
    base = unwrap(model)
    missing = [m for m in pack.base_modules if _find(base, m) is None]
    if missing:
        raise FingerprintMismatchError(
            f"pack {pack.ref} edits modules this model does not have: {', '.join(missing)} "
            f"(made for {pack.base.id}, model_type {pack.base.model_type})"
        )
    shown = "; ".join(f"{f.text!r} -> {f.target_new!r}" for f in pack.facts[:3])
    more = f" and {len(pack.facts) - 3} more" if len(pack.facts) > 3 else ""
    override = f"(Its facts: {shown}{more}.) Pass check=False (CLI: --force) to apply it anyway."
    quantized = [m for m in pack.base_modules if is_quantized(base.get_submodule(m))]
    if quantized:
        _check_quantized(base, pack, quantized, override)
    exact = [m for m in pack.base_modules if m not in quantized]
    if not exact:
        return
    found = module_fingerprints(base, exact)
    expected = pack.base.modules or {}
    if not expected:  # a pack that records only the combined fingerprint
        from ..model.fingerprint import combine

        if quantized or combine(found) == pack.base.fingerprint:
            return
        differing = exact
    else:
        differing = [m for m in exact if expected.get(m) != found[m]]
    if differing:
        raise FingerprintMismatchError(
            f"pack {pack.ref} was made for {pack.base.id} (fingerprint {pack.base.fingerprint[:19]}…), but this "
            f"model's original weights of {', '.join(differing)} differ: it is a different model. {override}"
        )


def _check_quantized(base: torch.nn.Module, pack: EditPack, quantized: list[str], override: str) -> None:
    """Quantized weights: compare shapes exactly and the (unquantized) input embedding's fingerprint."""
    from ..model.arch import spec_for

    for name in quantized:
        layer = base.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)
        shape = (layer.out_features, layer.in_features)
        want = pack.module_shape(name)  # (out, in)
        if shape != want:
            raise FingerprintMismatchError(f"pack {pack.ref}: {name} is {shape} here but {want} in the pack. {override}")
    if not pack.base.embedding:
        warnings.warn(f"pack {pack.ref} records no embedding fingerprint; its base cannot be checked on a quantized "
                      "model", stacklevel=3)
        return
    embed = spec_for(base).embed
    found = memo_fingerprint(base, f"{embed}.weight", base.get_submodule(embed).weight)
    if found != pack.base.embedding:
        raise FingerprintMismatchError(
            f"pack {pack.ref} was made for {pack.base.id}, but this quantized model's input embedding differs from "
            f"that model's: it is a different model. {override}"
        )


def _find(model: torch.nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


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


# ---------------------------------------------------------------------------------------------- applying
def records(model: torch.nn.Module) -> list[AppliedPack]:
    base = unwrap(model)
    if _RECORDS not in base.__dict__:
        base.__dict__[_RECORDS] = []
    return base.__dict__[_RECORDS]


def applied(model: torch.nn.Module) -> list[AppliedPack]:
    """The packs applied to ``model``, in the order they were applied (merged and unmerged)."""
    return list(records(model))


def apply(model: torch.nn.Module, packs, *, merge: bool = False, check: bool = True,
          on_conflict: str = "error", tokenizer=None) -> torch.nn.Module:
    """Apply one pack or a list of packs (``EditPack`` objects, pack directories, or ``user/name@version``).

    Unmerged (default): returns a ``peft.PeftModel`` with one adapter per pack, all active, in the given order.
    The model passed in is modified in place (PEFT injects its LoRA layers), so keep using the returned object;
    more packs can be applied to it later. ``merge=True`` adds the deltas to the weights and returns the plain
    transformers model (refused on bitsandbytes-quantized weights). ``check=False`` skips the fingerprint and
    parent checks; ``on_conflict="later"`` lets later packs override earlier ones (see the module docstring).

    Memory packs (``editpack.memory``) are never merged: the result is then wrapped in a
    :class:`~editpack.memory.MemoryModel` that consults them (in order, before the weights) when generating;
    ``tokenizer`` defaults to the one :func:`editpack.load_model` attached to the model.
    """
    new = _as_packs(packs)
    for pack in new:
        if not pack.appliable:
            raise PackFormatError(f"{pack.ref} is a {pack.kind}: it changes no model by itself "
                                  f"(edit with it: editpack.edit(..., method={pack.method!r}, editor=...))")
    present = records(model)
    wanted = resolve_conflicts([r.pack for r in present] + new, on_conflict)
    dropped = [r for r in present if not any(p is r.pack for p in wanted)]
    new = [p for p in new if any(p is w for w in wanted)]
    for record in dropped:
        if record.merged:
            raise PackConflictError(f"{record.pack.ref} is merged into the weights and cannot be overridden; revert "
                                    "the model first")
    if check:
        for pack in new:
            if pack.base_modules:
                check_fingerprint(model, pack)
        check_parents(new, [r.pack for r in present if r not in dropped and r.enabled])
    for pack in new:  # with or without check: a delta that would swamp the weights is never applied
        if pack.holds_weights:
            check_delta_scale(pack, weight_norms(model, [m for m in pack.modules if _find(unwrap(model), m)]),
                              "this model's")
    for record in dropped:
        model = remove(model, record.pack.ref)
    if not new:
        return model
    weights = [p for p in new if p.holds_weights]
    hooked = [p for p in new if p.hooks_modules]
    memories = [p for p in new if not p.holds_weights and not p.hooks_modules]
    wrapper = memory_wrapper(model)
    inner = wrapper.model if wrapper is not None else model
    if weights:
        inner = _apply_weights(inner, weights, merge)
    for pack in hooked:  # codebooks wrap their layer (under any LoRA layer PEFT put there); weights untouched
        records(inner).append(AppliedPack(pack, None, hook=pack.attach(inner)))
    if not memories and wrapper is None:
        return inner
    from ..packs.memory import MemoryModel

    if wrapper is None:
        tokenizer = tokenizer or getattr(unwrap(inner), "editpack_tokenizer", None)
        if tokenizer is None:
            raise PackFormatError("memory packs need the tokenizer: pass tokenizer=..., or load the model with "
                                  "editpack.load_model")
        wrapper = MemoryModel(inner, [], tokenizer)
    wrapper.model = inner
    wrapper.memories.extend(memories)
    records(inner).extend(AppliedPack(p, None, memory=True) for p in memories)
    return wrapper


def _apply_weights(model: torch.nn.Module, new: list[EditPack], merge: bool) -> torch.nn.Module:
    """Add weight packs as adapters (or merge them); see :func:`apply`."""
    from peft import PeftModel

    base = unwrap(model)
    if merge:
        quantized = sorted({m for p in new for m in p.modules if is_quantized(base.get_submodule(m))})
        if quantized:
            raise PackFormatError(
                f"refusing to merge into bitsandbytes-quantized weights ({', '.join(quantized)}): rounding back to "
                "the quantization grid loses most of a low-rank edit. Apply the packs unmerged (merge=False), or "
                "merge into a full-precision model and quantize that."
            )
        if isinstance(model, PeftModel):
            raise PackFormatError("this model carries unmerged packs; revert it (or merge=False) before merging")
        originals = base.__dict__.setdefault(ORIGINALS, {})
        for pack in new:
            for name in pack.modules:
                if name not in originals:
                    originals[name] = base_weight(model.get_submodule(name)).detach().clone()
    peft_model = _add_adapters(model, new)
    if merge:
        merged = peft_model.merge_and_unload(adapter_names=[p.adapter_name for p in new])
        if hasattr(merged, "peft_config"):
            del merged.peft_config
        records(merged).extend(AppliedPack(p, None, merged=True) for p in new)
        return merged
    records(peft_model).extend(AppliedPack(p, p.adapter_name) for p in new)
    unwrap(peft_model).__dict__[_WRAPPER] = peft_model
    _activate(peft_model)
    peft_model.eval()
    return peft_model


def _add_adapters(model: torch.nn.Module, packs: list[EditPack]):
    from peft import PeftModel, get_peft_model

    peft_model = model if isinstance(model, PeftModel) else None
    for pack in packs:
        config = pack.lora_config()
        # PEFT names the base by the model it is put on (and warns when the pack's portable name differs).
        config.base_model_name_or_path = unwrap(model).__dict__.get("name_or_path") or None
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=pack.adapter_name)
        else:
            peft_model.add_adapter(pack.adapter_name, config)
        _materialize_offloaded(peft_model, pack)
        _load_factors(peft_model, pack)
    return peft_model


def _load_factors(peft_model, pack: EditPack) -> None:
    """Copy the pack's factors into its LoRA layers.

    Equivalent to ``peft.set_peft_model_state_dict`` with the pack's adapter state dict, but without calling
    ``state_dict()`` on the whole model: bitsandbytes 0.50's 4-bit layers, once they have run on the CPU, undo
    their CPU weight packing in ``state_dict()`` and compute garbage afterwards.
    """
    base = unwrap(peft_model)
    with torch.no_grad():
        for module_name, delta in pack.stored_factors().items():
            layer = base.get_submodule(module_name)
            for factors, tensor in ((layer.lora_A, delta.A), (layer.lora_B, delta.B)):
                weight = factors[pack.adapter_name].weight
                if tuple(weight.shape) != tuple(tensor.shape):
                    raise PackFormatError(f"pack {pack.ref}: {module_name} factor is {tuple(tensor.shape)}, the "
                                          f"LoRA layer expects {tuple(weight.shape)}")
                weight.copy_(tensor.to(device=weight.device, dtype=weight.dtype))


def _materialize_offloaded(peft_model, pack: EditPack) -> None:
    """Give LoRA factors real storage where accelerate offloaded the base layer.

    PEFT places an adapter on its base layer's device, which for a layer offloaded to CPU or disk is ``meta``.
    accelerate's hooks sit on each leaf layer (the wrapped ``base_layer`` keeps its own), so the small LoRA
    factors can simply live, unhooked, on the layer's execution device.
    """
    base = unwrap(peft_model)
    for module_name in pack.modules:
        layer = base.get_submodule(module_name)
        for factors in (layer.lora_A, layer.lora_B):
            part = factors[pack.adapter_name]
            if any(p.is_meta for p in part.parameters()):
                part.to_empty(device=_execution_device(layer))


def _execution_device(layer: torch.nn.Module) -> torch.device:
    base = getattr(layer, "base_layer", layer)
    hook = getattr(base, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device) if not isinstance(hook.execution_device, int) else (
            torch.device("cuda", hook.execution_device))
    weight = base.weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def _activate(peft_model) -> None:
    """Make exactly the enabled unmerged packs active."""
    on = [r.adapter for r in records(peft_model) if r.adapter and r.enabled]
    if on:
        peft_model.base_model.enable_adapter_layers()
        peft_model.base_model.set_adapter(on)
    else:
        peft_model.base_model.disable_adapter_layers()


def _lookup(model: torch.nn.Module, key: str) -> AppliedPack:
    found = [r for r in records(model) if r.matches(key)]
    if not found:
        names = ", ".join(r.pack.ref for r in records(model)) or "none"
        raise PackFormatError(f"no pack {key!r} is applied to this model (applied: {names})")
    if len(found) > 1:
        raise PackFormatError(f"{key!r} names several applied packs: {[r.pack.ref for r in found]}; use name@version")
    return found[0]


def _dependents(model: torch.nn.Module, record: AppliedPack) -> list[AppliedPack]:
    return [r for r in records(model) if r.enabled and any(
        p["name"] == record.name and p["version"] == record.version for p in r.pack.requires)]


def _wrapper(model: torch.nn.Module):
    if memory_wrapper(model) is None:
        raise PackFormatError("memory packs are consulted by the model editpack.apply returned; pass that object")
    return model


def set_enabled(model: torch.nn.Module, key: str, enabled: bool) -> None:
    """Switch the unmerged pack ``key`` (name, ``name@version`` or adapter name) on or off."""
    record = _lookup(model, key)
    if record.hook is not None:
        record.hook.enabled = record.enabled = enabled
        return
    if record.memory:
        wrapper = _wrapper(model)
        record.enabled = enabled
        wrapper.memories = [r.pack for r in records(model) if r.memory and r.enabled]
        return
    if record.merged:
        raise PackFormatError(f"{record.pack.ref} is merged into the weights; it cannot be switched off (revert)")
    if not enabled and _dependents(model, record):
        raise PackConflictError(f"{[r.pack.ref for r in _dependents(model, record)]} were made on top of "
                                f"{record.pack.ref}; switch them off first")
    record.enabled = enabled
    _activate(model)


def remove(model: torch.nn.Module, key: str) -> torch.nn.Module:
    """Take the unmerged pack ``key`` off; returns the model to keep using (the plain model after the last)."""
    from peft import PeftModel

    record = _lookup(model, key)
    if record.merged:
        raise PackFormatError(f"{record.pack.ref} is merged into the weights; use revert() to restore the model")
    dependents = _dependents(model, record)
    if dependents:
        raise PackConflictError(f"{[r.pack.ref for r in dependents]} were made on top of {record.pack.ref}; "
                                "remove them first")
    if record.hook is not None:
        record.hook.remove()
        records(model).remove(record)
        return model
    if record.memory:
        wrapper = _wrapper(model)
        records(model).remove(record)
        wrapper.memories = [r.pack for r in records(model) if r.memory and r.enabled]
        return wrapper if any(r.memory for r in records(model)) else wrapper.model
    wrapper = memory_wrapper(model)
    if wrapper is not None:
        wrapper.model = remove(wrapper.model, key)
        return wrapper
    remaining = [r for r in records(model) if r.adapter and r is not record]
    if not remaining and isinstance(model, PeftModel):
        merged = [r for r in records(model) if not r.adapter]  # merged packs, memories, codebooks stay
        base = model.unload()
        if hasattr(base, "peft_config"):
            del base.peft_config
        base.__dict__.pop(_WRAPPER, None)
        base.__dict__[_RECORDS] = merged
        return base
    records(model).remove(record)
    model.delete_adapter(record.adapter)
    _activate(model)
    return model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Remove every applied pack; returns the plain transformers model with its original weights exactly."""
    from peft import PeftModel

    for record in records(model):  # codebooks: take their hooks off the layers
        if record.hook is not None:
            record.hook.remove()
    if memory_wrapper(model) is not None:  # memory packs: drop the wrapper
        model = model.model
    if not isinstance(model, PeftModel) and _WRAPPER in model.__dict__:
        model = model.__dict__[_WRAPPER]  # the plain model was passed, but PEFT layers are inside it
    if isinstance(model, PeftModel):
        model = model.unload()
    model.__dict__.pop(_WRAPPER, None)
    if hasattr(model, "peft_config"):  # PEFT leaves its config behind on the unloaded model
        del model.peft_config
    originals = model.__dict__.pop(ORIGINALS, None)
    if originals:
        with torch.no_grad():
            for name, tensor in originals.items():
                model.get_submodule(name).weight.copy_(tensor)
    model.__dict__.pop(_RECORDS, None)
    return model


def stack(packs, *, name: str | None = None, version: str = "1.0.0", on_conflict: str = "error") -> EditPack:
    """One pack whose delta is exactly the sum of ``packs``' deltas (factors concatenated, ranks add).

    Facts are the union (in order), the base is the shared base, and each input is recorded as a ``stacked``
    parent; parents the inputs were made on top of, and that are not themselves in the stack, carry over.
    """
    from ..packs.artifact import BaseModel, slug
    from ..packs.delta import WeightDelta

    packs = _as_packs(packs)
    kinds = sorted({p.kind for p in packs})
    if len(kinds) > 1:
        raise PackConflictError(f"packs of different kinds ({', '.join(kinds)}) cannot be stacked into one; apply "
                                "them together")
    if packs[0].hooks_modules:
        raise PackConflictError(f"{packs[0].kind} packs are not summed into one: apply them together "
                                "(editpack.apply with a list; each wraps its layer) or grow one with editpack.extend")
    packs = resolve_conflicts(packs, on_conflict)
    if not packs[0].holds_weights:  # memories stack by the union of their facts
        from dataclasses import replace

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
    from ..model.fingerprint import combine

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


def export_merged(model: torch.nn.Module, packs, output, *, tokenizer=None, check: bool = True,
                  on_conflict: str = "error", overwrite: bool = False):
    """Merge ``packs`` into ``model`` and write the result as a transformers model folder at ``output``.

    The folder appears atomically (nothing is left behind on failure or interruption) and records the packs it
    holds in ``editpack_applied.json`` (names, versions, content hashes: no local paths). Packs that cannot be
    merged (memory packs) are refused. ``model`` is reverted to its original weights afterwards. Returns the
    applied records.
    """
    from pathlib import Path

    from .._io import atomic_directory, atomic_write_json, check_output
    from ..packs.artifact import MERGED_RECORD
    from ..model.loading import quiet_progress

    ref = getattr(unwrap(model), "editpack_ref", None)
    source = Path(ref.path).resolve() if ref is not None and Path(ref.path).exists() else None
    if source is not None and (source == Path(output).resolve() or source in Path(output).resolve().parents):
        raise PackFormatError(f"{output} is the folder model {ref.id!r} was loaded from; write the merged model "
                              "elsewhere")
    check_output(output, overwrite=overwrite)
    loaded = _as_packs(packs)
    check_mergeable(loaded)
    tokenizer = tokenizer or getattr(unwrap(model), "editpack_tokenizer", None)
    merged = apply(model, loaded, merge=True, check=check, on_conflict=on_conflict)
    kept = applied(merged)
    try:
        with atomic_directory(Path(output), overwrite=overwrite) as tmp, quiet_progress():
            merged.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / MERGED_RECORD, {
                "base_model": loaded[0].base.to_dict(),
                "packs": [{"name": r.pack.name, "version": r.pack.version, "content": r.pack.content_id}
                          for r in kept],
            })
    finally:
        revert(merged)
    return kept
