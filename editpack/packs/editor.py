"""Trained editors: what a meta-learning method (MEND) learns, as a versioned artifact with a pack's life cycle.

An editor directory holds ``editor.safetensors`` (the learned network's tensors, by name), ``editpack.json``
(kind ``editor``: the method, the base model with the fingerprints of the modules the editor was trained for,
the settings, the training record: data files with their sha256 and record counts, seed, steps, the held-out
split's size and scores, a summary of the learning curve) and ``README.md`` (its card). It is saved atomically,
verified on load, pushed and pulled like any pack (``user/name@1.0.0``), and named by packs made with it (their
``editor`` hyper-parameter records its reference and content hash, never a path).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._io import read_safetensors, write_safetensors
from ..errors import PackFormatError
from .artifact import Artifact, register_kind
from .manifest import content_digest, section

EDITOR_WEIGHTS = "editor.safetensors"


@register_kind
@dataclass(kw_only=True)
class Editor(Artifact):
    """A trained editor in memory; :meth:`save` writes it, :func:`editpack.load_pack` reads and verifies one."""

    tensors: dict[str, torch.Tensor]
    #: The modules the editor transforms gradients of (their original weights' fingerprints are in ``base``).
    trained_modules: list[str]
    #: How it was trained: data (name, sha256, records), seed, steps, held-out size and scores, curve summary.
    training: dict[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "editor"
    payload_files: ClassVar[tuple[str, ...]] = (EDITOR_WEIGHTS,)
    card_tag: ClassVar[str] = "editor"
    card_template: ClassVar[str] = "editor_card.md"
    appliable: ClassVar[bool] = False

    def card_context(self) -> dict[str, Any]:
        curve = list(self.training.get("curve") or [])
        keys = [k for k in dict.fromkeys(k for row in curve for k in row) if k != "step"]
        training = {"steps": None, "seconds": None, "batch_size": None, "lr": None, "seed": None, "records": None,
                    "data": [], "held_out_records": 0, **self.training}
        held = training.get("held_out") or {}
        return {"training": training, "held_out": [(k, round(v, 4)) for k, v in held.items()],
                "curve": curve, "curve_keys": keys, "modules": self.trained_modules}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.facts:
            raise PackFormatError(f"editor {self.name}: an editor holds no facts")
        bad = [k for k, t in self.tensors.items() if not t.is_floating_point() or not torch.isfinite(t).all()]
        if bad:
            raise PackFormatError(f"editor {self.name}: tensors {bad[:3]} are not finite floating-point values")

    @property
    def content_id(self) -> str:
        parts = [json.dumps(sorted((k, list(t.shape)) for k, t in self.tensors.items())).encode()]
        parts += [self.tensors[k].float().contiguous().numpy().tobytes() for k in sorted(self.tensors)]
        return content_digest(parts)

    @property
    def base_modules(self) -> list[str]:
        return list(self.trained_modules)

    @property
    def requires(self) -> list[dict[str, Any]]:
        return []

    def parts(self) -> dict[str, str]:
        n = sum(t.numel() for t in self.tensors.values())
        return {"editor": f"{n:,} parameters for {len(self.trained_modules)} modules"}

    def storage_summary(self) -> str:
        steps = self.training.get("steps")
        return (f"a trained {self.method.upper()} editor ({self.parts()['editor']}"
                + (f", {steps} training steps" if steps else "") + "); it changes no weights by itself: "
                f"`editpack edit --method {self.method} --editor {self.name}@{self.version}` makes weight packs")

    def payload_manifest(self) -> dict[str, Any]:
        return {"editor": {"modules": self.trained_modules, "content": self.content_id,
                           "tensors": {k: list(t.shape) for k, t in sorted(self.tensors.items())},
                           "training": self.training}}

    def write_payload(self, directory: Path) -> None:
        write_safetensors({k: t.float().contiguous() for k, t in self.tensors.items()}, directory / EDITOR_WEIGHTS)

    @classmethod
    def from_manifest(cls, directory: Path, manifest: dict[str, Any]) -> "Editor":
        editor = section(manifest, "editor", directory)
        modules = editor.get("modules")
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise PackFormatError(f"{directory}: editor.modules must be a list of module names")
        tensors = read_safetensors(directory / EDITOR_WEIGHTS)
        shapes = {k: list(t.shape) for k, t in tensors.items()}
        if editor.get("tensors") != shapes:
            raise PackFormatError(f"{directory / EDITOR_WEIGHTS}: its tensors are not the ones the manifest lists")
        training = editor.get("training") or {}
        pack = cls(**cls.header_fields(directory, manifest), tensors=tensors, trained_modules=modules,
                   training=training if isinstance(training, dict) else {})
        if editor.get("content") != pack.content_id:
            raise PackFormatError(f"{directory}: the editor's content is not the editor.content the manifest records")
        return pack
