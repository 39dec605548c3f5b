"""Fingerprints of model weights: which exact base weights a pack (or a statistics cache) belongs to.

A fingerprint hashes the named parameters after rounding them to bfloat16, so the same checkpoint loaded in
float32 or bfloat16 gives the same fingerprint, while any real change to the weights (another model, an edit
merged in, a fine-tune) changes it.

A pack records one hash per module it edits (:func:`module_fingerprints`) and their combination
(:func:`combine`), so packs can be stacked without the model and a mismatch names the module that differs.
Weights that :func:`editpack.apply` merged packs into are hashed as they were before the merge; weights that
accelerate offloaded are read back from their offload store; bitsandbytes-quantized weights cannot be compared
exactly and are reported by :func:`is_quantized` so callers can fall back to the embedding fingerprint.

Hashing is the expensive part at scale (a 7B model's embedding and first blocks are gigabytes, copied to the host
and hashed for every edit), so each tensor's hash is remembered on the model object (:func:`memo_fingerprint`)
together with a signature computed where the tensor lives: its storage, version counter, and float64 sum and
norm. In-place writes through ``.data`` (as PEFT's merge does) leave the version counter alone but change the sum
or the norm, so a remembered hash is used only for the same storage with the same contents.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterable

import torch

from .._lazy import accelerate_utils

ORIGINALS = "_editpack_originals"  # {module name: weight before merge}, set by editpack.apply(merge=True)
_MEMO = "_editpack_fingerprints"  # {key: (signature, fingerprint)} on the model object


def memory_wrapper(model: torch.nn.Module) -> torch.nn.Module | None:
    """``model`` when it is editpack's memory-pack wrapper (``editpack.packs.memory.MemoryModel``), else ``None``."""
    return model if getattr(type(model), "editpack_wrapper", False) else None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper or a memory wrapper (the model itself otherwise)."""
    if memory_wrapper(model) is not None:
        return unwrap(model.model)
    if type(model).__module__.startswith("peft.") and hasattr(model, "peft_config"):
        return model.base_model.model  # PeftModel -> LoraModel -> transformers model
    return model


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The layer itself, looking through a PEFT LoRA wrapper to the wrapped base layer."""
    base = getattr(module, "base_layer", None)
    return base if base is not None else module


def base_weight(module: torch.nn.Module) -> torch.Tensor:
    """A module's own weight, looking through a PEFT LoRA layer to the wrapped base layer."""
    return base_layer(module).weight


def edited_layer(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """``(layer, attribute)`` that hold the weight an edit of ``name`` changes: a module's base layer and
    ``"weight"``, or, where ``name`` is a stacked parameter (a Mixture-of-Experts ``…experts.down_proj``), the
    module that owns it (looking through PEFT's wrappers) and the parameter's name. Raises ``AttributeError``
    when the model has neither."""
    try:
        return base_layer(model.get_submodule(name)), "weight"
    except AttributeError:
        owner, _, attribute = name.rpartition(".")
        layer = model.get_submodule(owner) if owner else model
        while getattr(layer, "base_layer", None) is not None:
            layer = layer.base_layer
        if not isinstance(getattr(layer, attribute, None), torch.Tensor):
            raise AttributeError(f"{type(model).__name__} has no module or parameter {name!r}") from None
        return layer, attribute


def weight_of(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The weight an edit of ``name`` changes (:func:`edited_layer`)."""
    layer, attribute = edited_layer(model, name)
    return getattr(layer, attribute)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether the (base) layer holds bitsandbytes-quantized weights."""
    return type(base_layer(module)).__module__.startswith("bitsandbytes")


@contextlib.contextmanager
def materialized(module: torch.nn.Module):
    """Yield the base layer with real weights, even when accelerate offloaded them (meta device + hook)."""
    layer = base_layer(module)
    if getattr(layer, "_hf_hook", None) is not None and any(p.is_meta for p in layer.parameters(recurse=False)):

        with accelerate_utils.align_module_device(layer, execution_device="cpu"):
            yield layer
    else:
        yield layer


def tensor_digest(tensor: torch.Tensor, digest: "hashlib._Hash") -> None:
    data = tensor.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
    digest.update(str(tuple(data.shape)).encode())
    digest.update(memoryview(data.view(torch.int16).numpy()))  # hashed in place, no copy


def weight_fingerprint(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256()
    tensor_digest(tensor, digest)
    return "sha256:" + digest.hexdigest()


def _signature(tensor: torch.Tensor) -> tuple | None:
    """What must be unchanged for a remembered hash of ``tensor`` to hold (``None``: do not remember)."""
    data = tensor.detach()
    if data.device.type == "meta" or not data.is_floating_point():
        return None
    sums = torch.stack([data.sum(dtype=torch.float64), torch.linalg.vector_norm(data, dtype=torch.float64)])
    return (data.data_ptr(), data.device, tuple(data.shape), data.dtype, tensor._version, tuple(sums.tolist()))


def memo_fingerprint(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> str:
    """:func:`weight_fingerprint` of ``tensor``, remembered on ``model`` under ``key`` (see the module docstring)."""
    memo = model.__dict__.setdefault(_MEMO, {})
    signature = _signature(tensor)
    known = memo.get(key)
    if signature is not None and known is not None and known[0] == signature:
        return known[1]
    value = weight_fingerprint(tensor)
    if signature is not None:
        memo[key] = (signature, value)
    return value


def module_fingerprints(model: torch.nn.Module, module_names: Iterable[str]) -> dict[str, str]:
    """``{module: sha256:<hex>}`` over each module's original weight (before any merged pack)."""
    base = unwrap(model)
    originals = getattr(base, ORIGINALS, None) or {}
    out = {}
    for name in sorted(set(module_names)):
        if name in originals:
            out[name] = memo_fingerprint(base, f"original:{name}", originals[name])
            continue
        owner, attribute = edited_layer(base, name)
        if attribute == "weight" and not isinstance(getattr(owner, "weight", None), torch.Tensor):
            out[name] = parameters_fingerprint(base, [name + "."])  # a whole block (a codebook on a MoE block)
            continue
        with materialized(owner) as layer:
            out[name] = memo_fingerprint(base, name if attribute != "weight" else f"{name}.weight",
                                         getattr(layer, attribute))
    return out


def weight_norms(model: torch.nn.Module, module_names: Iterable[str]) -> dict[str, float]:
    """``{module: ‖W‖_F}`` of each module's original weight (before any merged pack); bitsandbytes-quantized
    weights, whose values are not stored as such, are left out."""
    base = unwrap(model)
    originals = getattr(base, ORIGINALS, None) or {}
    out = {}
    for name in sorted(set(module_names)):
        module, attribute = edited_layer(base, name)
        if name in originals:
            value = _norm(originals[name])
        elif is_quantized(module) or not isinstance(getattr(module, attribute, None), torch.Tensor):
            continue  # quantized, or a whole block (a codebook's): no one weight to compare a delta with
        else:
            with materialized(module) as layer:
                value = _norm(getattr(layer, attribute))
        if value > 0:
            out[name] = float(value)
    return out


def _norm(weight: torch.Tensor) -> torch.Tensor:
    """The Frobenius norm, accumulated in at least float32 (half-precision weights are not copied for it)."""
    low = weight.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(weight.detach(), dtype=torch.float32 if low else None)


def combine(fingerprints: dict[str, str]) -> str:
    """One ``sha256:<hex>`` for a set of per-module fingerprints (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(fingerprints):
        digest.update(f"{name}={fingerprints[name]}\n".encode())
    return "sha256:" + digest.hexdigest()


def parameters_fingerprint(model: torch.nn.Module, prefixes: Iterable[str]) -> str:
    """``sha256:<hex>`` over every base parameter whose name starts with one of ``prefixes`` (each parameter's
    name and :func:`weight_fingerprint`, in order).

    PEFT adapters (unmerged packs) are left out and wrapped layers named as before wrapping, so a model with
    unmerged packs has the fingerprint of its base.
    """
    prefixes = tuple(prefixes)
    base = unwrap(model)
    digest = hashlib.sha256()
    for name, param in base.named_parameters():
        if "lora_" in name:  # applied packs' adapters are not part of the base weights
            continue
        name = name.replace(".base_layer.", ".")
        if name.startswith(prefixes):
            digest.update(f"{name}={memo_fingerprint(base, name, param)}\n".encode())
    return "sha256:" + digest.hexdigest()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run the base model: every PEFT adapter layer in ``model`` switched off, restored afterwards."""
    layers = [m for m in unwrap(model).modules() if hasattr(m, "enable_adapters") and hasattr(m, "base_layer")]
    was = [not getattr(m, "disable_adapters", False) for m in layers]
    grads = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield model
    finally:
        for m, on in zip(layers, was):
            m.enable_adapters(on)
        for p, flag in grads:  # PEFT's toggle also sets requires_grad; put it back as it was
            p.requires_grad_(flag)
