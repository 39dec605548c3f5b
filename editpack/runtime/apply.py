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

from dataclasses import dataclass
from typing import Any

import torch

from .._lazy import peft
from ..errors import PackConflictError, PackFormatError
from ..model.fingerprint import ORIGINALS, edited_layer, is_quantized, memory_wrapper, unwrap, weight_norms, weight_of
from ..packs.memory.model import MemoryModel
from ..packs.weights import EditPack, check_delta_scale
from .checks import check_fingerprint, find_module
from .combine import as_packs, check_parents, resolve_conflicts
from .lora import add_adapters

_RECORDS = "_editpack_records"  # list[AppliedPack] on the transformers model


_WRAPPER = "_editpack_peft_model"  # the PeftModel wrapping it, so revert() works from either object


@dataclass
class AppliedPack:
    """One pack on a model: its adapter name (``None`` once merged) and whether it is switched on."""

    pack: EditPack
    adapter: str | None
    merged: bool = False
    enabled: bool = True
    memory: bool = False  # a memory pack, consulted by the MemoryModel wrapper
    hook: Any = None  # a codebook's forward hook on the layer it wraps (``editpack.packs.codebook.CodebookHook``)

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

    Memory packs (``editpack.packs.memory``) are never merged: the result is then wrapped in a
    :class:`~editpack.packs.memory.MemoryModel` that consults them (in order, before the weights) when generating;
    ``tokenizer`` defaults to the one :func:`editpack.load_model` attached to the model.
    """
    new = as_packs(packs)
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
            check_delta_scale(pack, weight_norms(model, [m for m in pack.modules if find_module(unwrap(model), m)]),
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

    base = unwrap(model)
    if merge:
        quantized = sorted({m for p in new for m in p.modules if is_quantized(edited_layer(base, m)[0])})
        if quantized:
            raise PackFormatError(
                f"refusing to merge into bitsandbytes-quantized weights ({', '.join(quantized)}): rounding back to "
                "the quantization grid loses most of a low-rank edit. Apply the packs unmerged (merge=False), or "
                "merge into a full-precision model and quantize that."
            )
        if isinstance(model, peft.PeftModel):
            raise PackFormatError("this model carries unmerged packs; revert it (or merge=False) before merging")
        originals = base.__dict__.setdefault(ORIGINALS, {})
        for pack in new:
            for name in pack.modules:
                if name not in originals:
                    originals[name] = weight_of(model, name).detach().clone()
    peft_model = add_adapters(model, new)
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
    if not remaining and isinstance(model, peft.PeftModel):
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

    for record in records(model):  # codebooks: take their hooks off the layers
        if record.hook is not None:
            record.hook.remove()
    if memory_wrapper(model) is not None:  # memory packs: drop the wrapper
        model = model.model
    if not isinstance(model, peft.PeftModel) and _WRAPPER in model.__dict__:
        model = model.__dict__[_WRAPPER]  # the plain model was passed, but PEFT layers are inside it
    if isinstance(model, peft.PeftModel):
        model = model.unload()
    model.__dict__.pop(_WRAPPER, None)
    if hasattr(model, "peft_config"):  # PEFT leaves its config behind on the unloaded model
        del model.peft_config
    originals = model.__dict__.pop(ORIGINALS, None)
    if originals:
        with torch.no_grad():
            for name, tensor in originals.items():
                weight_of(model, name).copy_(tensor)
    model.__dict__.pop(_RECORDS, None)
    return model
