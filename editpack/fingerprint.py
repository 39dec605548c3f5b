"""Fingerprints of model weights: which exact base weights a pack (or a statistics cache) belongs to.

A fingerprint hashes the named parameters after rounding them to bfloat16, so the same checkpoint loaded in
float32 or bfloat16 gives the same fingerprint, while any real change to the weights (another model, an edit
merged in, a fine-tune) changes it.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def base_weight(module: torch.nn.Module) -> torch.Tensor:
    """A module's own weight, looking through a PEFT LoRA layer to the wrapped base layer."""
    base = getattr(module, "base_layer", None)
    return base.weight if base is not None else module.weight


def tensor_digest(tensor: torch.Tensor, digest: "hashlib._Hash") -> None:
    data = tensor.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
    digest.update(str(tuple(data.shape)).encode())
    digest.update(data.view(torch.int16).numpy().tobytes())


def modules_fingerprint(model: torch.nn.Module, module_names: Iterable[str]) -> str:
    """``sha256:<hex>`` over the weights of ``module_names`` (sorted), as a pack records its base."""
    base = unwrap(model)
    digest = hashlib.sha256()
    for name in sorted(set(module_names)):
        digest.update(name.encode() + b"\0")
        tensor_digest(base_weight(base.get_submodule(name)), digest)
    return "sha256:" + digest.hexdigest()


def parameters_fingerprint(model: torch.nn.Module, prefixes: Iterable[str]) -> str:
    """``sha256:<hex>`` over every parameter whose name starts with one of ``prefixes``."""
    prefixes = tuple(prefixes)
    digest = hashlib.sha256()
    for name, param in unwrap(model).named_parameters():
        if name.startswith(prefixes):
            digest.update(name.encode() + b"\0")
            tensor_digest(param, digest)
    return "sha256:" + digest.hexdigest()
