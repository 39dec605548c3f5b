"""Codebook packs: GRACE-style edits kept as a lookup table at one layer, applied by wrapping that layer.

A codebook belongs to one module (an MLP output projection). Each entry is one edited fact:

- its **key**: the module's input at the edit prompt's last token (or the subject's last token, by the method's
  ``key_position``), a vector of the module's input width;
- its **value**: the module output there that makes the model answer the new target (optimised once, when the
  entry is made);
- its **deferral radius**: how far from the key an input may lie and still be answered from the codebook.

Applied (:func:`editpack.apply`), a forward hook on the module compares the module's input at every position with
the keys; where the nearest key lies within its radius, the module's output at that position is replaced by that
key's value, and everywhere else the layer computes as before (GRACE, Hartvigsen et al. 2023). The weights never
change, so a codebook works unmerged on full, bitsandbytes-quantized and accelerate-offloaded models and inside
``transformers`` pipelines, stacks with weight and memory packs, and taking the hook off reverts exactly.

Files: ``codebook.safetensors`` (``keys``, ``values``, ``radii``), ``editpack.json`` (module, entry count, content
hash, facts, …) and ``README.md`` (the card). Only JSON and safetensors are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._io import read_safetensors, write_safetensors
from ..errors import PackFormatError
from ..facts import kept_indices, normal_text
from ..model.hooks import LayerHook, hook_target
from .artifact import Artifact, register_kind
from .manifest import MANIFEST, content_digest, section

CODEBOOK_WEIGHTS = "codebook.safetensors"


@register_kind
@dataclass(kw_only=True)
class CodebookPack(Artifact):
    """A codebook pack in memory (one entry per fact, in the order of ``facts``)."""

    module: str  # the wrapped module, e.g. ``model.layers.25.mlp.down_proj``
    keys: torch.Tensor  # (n, d_in) float32
    values: torch.Tensor  # (n, d_out) float32
    radii: torch.Tensor  # (n,) float32, ≥ 0

    kind: ClassVar[str] = "codebook"
    payload_files: ClassVar[tuple[str, ...]] = (CODEBOOK_WEIGHTS,)
    scores_logits: ClassVar[bool] = True
    hooks_modules: ClassVar[bool] = True
    card_tag: ClassVar[str] = "codebook"

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self.facts)
        if (self.keys.ndim != 2 or self.values.ndim != 2 or self.radii.ndim != 1
                or not self.keys.shape[0] == self.values.shape[0] == self.radii.shape[0] == n):
            raise PackFormatError(f"codebook pack {self.name}: keys {tuple(self.keys.shape)}, values "
                                  f"{tuple(self.values.shape)} and radii {tuple(self.radii.shape)} for {n} facts")

    # -------------------------------------------------------------------------------------- identity
    @property
    def content_id(self) -> str:
        return content_digest([
            self.module.encode(),
            json.dumps([f.to_dict() for f in self.facts], sort_keys=True).encode(),
            *(t.float().contiguous().numpy().tobytes() for t in (self.keys, self.values, self.radii)),
        ])

    @property
    def base_modules(self) -> list[str]:
        return [self.module]

    def parts(self) -> dict[str, str]:
        return {self.module: f"{len(self.facts)} codebook entries"}

    def module_shape(self, module: str) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.keys.shape[1])

    def storage_summary(self) -> str:
        n = len(self.facts)
        return (f"a codebook of {n} entr{'ies' if n != 1 else 'y'} at `{self.module}` (keys of width "
                f"{self.keys.shape[1]}, values of width {self.values.shape[1]}, median deferral radius "
                f"{float(self.radii.median()) if n else 0.0:.3g}); applied by wrapping that layer, the model's "
                "weights are untouched")

    # -------------------------------------------------------------------------------------- building
    def without(self, facts) -> list[int]:
        """Indices of the entries that stay when ``facts`` replace the ones about the same subject and relation."""
        return kept_indices(self.facts, facts)

    # -------------------------------------------------------------------------------------- applying
    def attach(self, model: torch.nn.Module) -> "CodebookHook":
        """Wrap the pack's module of ``model`` with this codebook (a forward hook); returns the hook."""
        return CodebookHook(self, hook_target(model, self.module, self.ref))

    # -------------------------------------------------------------------------------------- disk
    def payload_manifest(self) -> dict[str, Any]:
        return {"codebook": {"module": self.module, "entries": len(self.facts), "key_dim": int(self.keys.shape[1]),
                             "value_dim": int(self.values.shape[1]), "content": self.content_id}}

    def write_payload(self, directory: Path) -> None:
        write_safetensors({"keys": self.keys.float().contiguous(), "values": self.values.float().contiguous(),
                           "radii": self.radii.float().contiguous()}, directory / CODEBOOK_WEIGHTS)

    @classmethod
    def from_manifest(cls, directory: Path, manifest: dict[str, Any]) -> "CodebookPack":
        info = section(manifest, "codebook", directory)
        where = directory / CODEBOOK_WEIGHTS
        tensors = read_safetensors(where)
        for name, ndim in (("keys", 2), ("values", 2), ("radii", 1)):
            tensor = tensors.get(name)
            if tensor is None or tensor.ndim != ndim or not tensor.is_floating_point():
                raise PackFormatError(f"{where}: expected a floating-point tensor {name!r} of {ndim} dimension(s)")
            if not torch.isfinite(tensor).all():
                raise PackFormatError(f"{where}: {name} hold NaN or infinite values")
        if (tensors["radii"] < 0).any():
            raise PackFormatError(f"{where}: a deferral radius is negative")
        module = info.get("module")
        if not isinstance(module, str) or not module or module.startswith(".") or "/" in module:
            raise PackFormatError(f"{directory / MANIFEST}: codebook.module must be a module name")
        pack = cls(**cls.header_fields(directory, manifest), module=module, keys=tensors["keys"].float(),
                   values=tensors["values"].float(), radii=tensors["radii"].float())
        if info.get("content") != pack.content_id:
            raise PackFormatError(f"{directory}: the codebook's content is not the codebook.content the manifest "
                                  "records")
        return pack


def insert(keys: torch.Tensor, radii: torch.Tensor, targets: list[str], key: torch.Tensor, radius: float,
           target: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """GRACE's rule for adding an entry: returns the new keys and radii (the new entry last) and what happened.

    Against the nearest existing key at distance ``d``: no overlap (``d > r_j + radius``) adds the entry as it
    is; an overlap with the same answer grows the existing radius to ``d``; an overlap with another answer
    splits the difference, setting both radii to ``d / 2`` so that neither claims the other's key.
    """
    key = key.float().reshape(1, -1)
    if not len(keys):
        return key, torch.tensor([float(radius)]), "added"
    distances = torch.cdist(key, keys.float())[0]
    j = int(distances.argmin())
    d = float(distances[j])
    radii = radii.clone()
    if d > float(radii[j]) + radius:
        event = "added"
    elif normal_text(targets[j]) == normal_text(target):
        radii[j] = max(float(radii[j]), d)
        event = "expanded"
    else:
        radii[j] = min(float(radii[j]), d / 2)
        radius = min(radius, d / 2)
        event = "split"
    return torch.cat([keys.float(), key]), torch.cat([radii, torch.tensor([float(radius)])]), event


class CodebookHook(LayerHook):
    """Answers from one codebook: the output at a position whose input lies within the nearest key's radius
    becomes that key's value."""

    def __init__(self, pack: CodebookPack, module: torch.nn.Module) -> None:
        self.pack = pack
        super().__init__(module)

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return self.on(device, dtype, lambda d, t: (self.pack.keys.to(d, torch.float32), self.pack.values.to(d, t),
                                                     self.pack.radii.to(d, torch.float32)))

    @torch.no_grad()
    def match(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each row of ``inputs`` (…, d_in): the nearest entry, and whether it lies within that entry's radius."""
        keys, _, radii = self.tensors(inputs.device, inputs.dtype)
        distances = torch.cdist(inputs.reshape(-1, inputs.shape[-1]).float(), keys)
        best, index = distances.min(dim=1)
        return index, best <= radii[index]

    def change(self, inputs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
        if not len(self.pack.facts):
            return None
        index, hit = self.match(inputs)
        if not bool(hit.any()):
            return None
        _, values, _ = self.tensors(hidden.device, hidden.dtype)
        flat = hidden.reshape(-1, hidden.shape[-1]).clone()
        flat[hit] = values[index[hit]]
        return flat.reshape(hidden.shape)
