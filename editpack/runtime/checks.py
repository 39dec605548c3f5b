"""Whether a pack was made for this model: the fingerprints of the original weights it edits (on
bitsandbytes-quantized weights, which cannot be hashed exactly, the shapes and the input embedding)."""

from __future__ import annotations

import warnings

import torch

from ..errors import FingerprintMismatchError
from ..model.arch import spec_for
from ..model.fingerprint import combine, edited_layer, is_quantized, memo_fingerprint, module_fingerprints, unwrap
from ..packs.weights import EditPack


def check_fingerprint(model: torch.nn.Module, pack: EditPack) -> None:
    """Raise :class:`FingerprintMismatchError` unless ``model`` has the weights ``pack`` was made for."""
    base = unwrap(model)
    missing = [m for m in pack.base_modules if find_module(base, m) is None]
    if missing:
        raise FingerprintMismatchError(
            f"pack {pack.ref} edits modules this model does not have: {', '.join(missing)} "
            f"(made for {pack.base.id}, model_type {pack.base.model_type})"
        )
    shown = "; ".join(f"{f.text!r} -> {f.target_new!r}" for f in pack.facts[:3])
    more = f" and {len(pack.facts) - 3} more" if len(pack.facts) > 3 else ""
    override = f"(Its facts: {shown}{more}.) Pass check=False (CLI: --force) to apply it anyway."
    quantized = [m for m in pack.base_modules if is_quantized(edited_layer(base, m)[0])]
    if quantized:
        _check_quantized(base, pack, quantized, override)
    exact = [m for m in pack.base_modules if m not in quantized]
    if not exact:
        return
    found = module_fingerprints(base, exact)
    expected = pack.base.modules or {}
    if not expected:  # a pack that records only the combined fingerprint

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


def find_module(model: torch.nn.Module, name: str):
    """The layer holding the weight ``name`` edits (a module, or a stacked parameter's owner), else ``None``."""
    try:
        return edited_layer(model, name)[0]
    except AttributeError:
        return None
