"""Putting packs on models and taking them off again.

``apply(model, pack)`` adds the pack as a named PEFT LoRA adapter (unmerged: the base weights stay untouched
and the adapter can be removed), or with ``merge=True`` folds it into the weights after keeping a copy of the
original weights of the touched modules. ``revert(model)`` undoes either, restoring the original weights bit
for bit. Before anything changes, the pack's base fingerprint is compared with the model's weights.
"""

from __future__ import annotations


import torch

from .errors import FingerprintMismatchError, PackFormatError
from .fingerprint import base_weight, modules_fingerprint, unwrap
from .pack import EditPack

_ORIGINALS = "_editpack_originals"
_MERGED = "_editpack_merged"


def _as_packs(packs) -> list[EditPack]:
    items = packs if isinstance(packs, (list, tuple)) else [packs]
    out = []
    for item in items:
        if isinstance(item, EditPack):
            out.append(item)
        else:
            out.append(EditPack.load(item))
    if not out:
        raise PackFormatError("no pack given")
    return out


def check_fingerprint(model: torch.nn.Module, pack: EditPack) -> None:
    """Raise :class:`FingerprintMismatchError` unless ``model`` has the weights ``pack`` was made for."""
    base = unwrap(model)
    missing = [m for m in pack.modules if _find(base, m) is None]
    if missing:
        raise FingerprintMismatchError(
            f"pack {pack.name} {pack.version} edits modules this model does not have: {', '.join(missing)} "
            f"(made for {pack.base.id}, model_type {pack.base.model_type})"
        )
    found = modules_fingerprint(model, pack.modules)
    if found != pack.base.fingerprint:
        raise FingerprintMismatchError(
            f"pack {pack.name} {pack.version} was made for {pack.base.id} with fingerprint "
            f"{pack.base.fingerprint[:19]}…, but this model's weights of {', '.join(pack.modules)} hash to "
            f"{found[:19]}…: it is a different (or already edited) model. Pass check_fingerprint=False "
            "(CLI: --force) to apply it anyway."
        )


def _find(model: torch.nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def apply(model: torch.nn.Module, packs, *, merge: bool = False, check: bool = True) -> torch.nn.Module:
    """Apply one pack or a list of packs (``EditPack`` objects or pack directories) to ``model``.

    Unmerged (default): returns a ``peft.PeftModel`` with one adapter per pack, all active. The model passed in
    is modified in place (PEFT injects its LoRA layers), so keep using the returned object.
    ``merge=True``: the deltas are added to the weights; returns the plain transformers model.
    ``check=False`` skips the fingerprint check.
    """
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    packs = _as_packs(packs)
    if check:
        for pack in packs:
            check_fingerprint(model, pack)
    if merge:
        if isinstance(model, PeftModel):
            raise PackFormatError("this model carries unmerged packs; revert it (or merge=False) before merging")
        originals = getattr(model, _ORIGINALS, None) or {}
        for pack in packs:
            for name in pack.modules:
                if name not in originals:
                    originals[name] = base_weight(model.get_submodule(name)).detach().clone()
        setattr(model, _ORIGINALS, originals)
    peft_model = model if isinstance(model, PeftModel) else None
    names = []
    for pack in packs:
        name = pack.adapter_name
        if peft_model is None:
            peft_model = get_peft_model(model, pack.lora_config(), adapter_name=name)
        else:
            if name in peft_model.peft_config:
                raise PackFormatError(f"a pack named {name!r} is already applied to this model")
            peft_model.add_adapter(name, pack.lora_config())
        result = set_peft_model_state_dict(peft_model, pack.adapter_state_dict(), adapter_name=name)
        unexpected = [k for k in result.unexpected_keys if "lora_" in k]
        if unexpected:
            raise PackFormatError(f"pack {pack.name}: adapter weights did not load: {unexpected[:3]}")
        names.append(name)
    all_names = list(peft_model.peft_config)
    peft_model.base_model.set_adapter(all_names)
    if merge:
        merged = peft_model.merge_and_unload(adapter_names=all_names)
        setattr(merged, _MERGED, getattr(merged, _MERGED, []) + [f"{p.name}@{p.version}" for p in packs])
        return merged
    peft_model.eval()
    return peft_model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Remove every applied pack; returns the plain transformers model with its original weights exactly."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.unload()
    if hasattr(model, "peft_config"):  # PEFT leaves its config behind on the unloaded model
        del model.peft_config
    originals = getattr(model, _ORIGINALS, None)
    if originals:
        with torch.no_grad():
            for name, tensor in originals.items():
                model.get_submodule(name).weight.copy_(tensor)
        delattr(model, _ORIGINALS)
    if hasattr(model, _MERGED):
        delattr(model, _MERGED)
    return model


def applied(model: torch.nn.Module) -> list[str]:
    """Names of the packs applied to ``model``: unmerged adapters first, then merged packs."""
    from peft import PeftModel

    names = list(model.peft_config) if isinstance(model, PeftModel) else []
    return names + list(getattr(unwrap(model), _MERGED, []))
