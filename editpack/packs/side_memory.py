"""Side-memory packs: WISE-style edits held in a side copy of one layer, with a router in front of it.

The pack holds a delta ``ΔW`` for one module (an MLP output projection), the side memory being ``W + ΔW``, and a
routing threshold. Applied (:func:`editpack.apply`), a forward hook on the module computes, at every position,
the activation difference ``‖ΔW x‖`` (WISE's routing score: how far the side memory's output lies from the main
memory's for that input); where it exceeds the threshold the position takes the side memory's output
``W x + ΔW x``, elsewhere the main memory's ``W x`` as before. The weights never change: it works unmerged on
full, quantized and offloaded models and in pipelines, stacks with weight, codebook and memory packs, and
removing the hook reverts exactly.

Files: a PEFT LoRA adapter for the module (``adapter_config.json``, ``adapter_model.safetensors``: the side delta,
loadable by PEFT, which would apply it without the router), ``editpack.json`` (the ``router`` section: module and
threshold), ``README.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import PackFormatError
from ..model.hooks import LayerHook, hook_target
from .artifact import register_kind
from .manifest import MANIFEST, content_digest, section
from .weights import EditPack


@register_kind
@dataclass(kw_only=True)
class SideMemoryPack(EditPack):
    """A side memory (one module's ``ΔW``) and its routing threshold."""

    threshold: float = 0.0

    kind: ClassVar[str] = "side_memory"
    holds_weights: ClassVar[bool] = False  # routed by a hook, never added to the weights
    mergeable: ClassVar[bool] = False
    hooks_modules: ClassVar[bool] = True
    card_tag: ClassVar[str] = "side-memory"

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.delta.modules) != 1:
            raise PackFormatError(f"side-memory pack {self.name}: one module, not {sorted(self.delta.modules)}")

    @property
    def module(self) -> str:
        return self.modules[0]

    @property
    def content_id(self) -> str:
        return content_digest([super().content_id.encode(), json.dumps({"threshold": self.threshold}).encode()])

    def parts(self) -> dict[str, str]:
        (rank,) = super().parts().values()
        return {self.module: f"side memory {rank}, threshold {self.threshold:.4g}"}

    def storage_summary(self) -> str:
        return (f"a side memory of `{self.module}` ({super().parts()[self.module]}) behind a router (activation "
                f"difference > {self.threshold:.4g}); applied by wrapping that layer, the model's weights are "
                "untouched")

    def attach(self, model: torch.nn.Module) -> "SideMemoryHook":
        return SideMemoryHook(self, hook_target(model, self.module, self.ref))

    def payload_manifest(self) -> dict[str, Any]:
        return {**super().payload_manifest(), "router": {"module": self.module, "threshold": self.threshold,
                                                         "content": self.content_id}}

    @classmethod
    def from_manifest(cls, directory: Path, manifest: dict[str, Any]) -> "SideMemoryPack":
        router = section(manifest, "router", directory)
        threshold = router.get("threshold")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0:
            raise PackFormatError(f"{directory / MANIFEST}: router.threshold must be a number ≥ 0")
        pack = super().from_manifest(directory, manifest)
        pack.threshold = float(threshold)
        if router.get("module") != pack.module or router.get("content") != pack.content_id:
            raise PackFormatError(f"{directory / MANIFEST}: the router section does not match the side memory")
        return pack


class SideMemoryHook(LayerHook):
    """Routes positions to the side memory: ``W x + ΔW x`` where ``‖ΔW x‖`` exceeds the threshold."""

    def __init__(self, pack: SideMemoryPack, module: torch.nn.Module) -> None:
        (delta,) = pack.delta.modules.values()
        self.A, self.B, self.threshold = delta.A, delta.B, pack.threshold
        super().__init__(module)

    def side(self, inputs: torch.Tensor) -> torch.Tensor:
        """``ΔW x`` for every position of ``inputs`` (float32)."""
        A, B = self.on(inputs.device, torch.float32, lambda d, t: (self.A.to(d, t), self.B.to(d, t)))
        return (inputs.float() @ A.T) @ B.T

    def change(self, inputs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        shift = self.side(inputs)
        routed = (shift.norm(dim=-1, keepdim=True) > self.threshold).to(hidden.dtype)
        return hidden + routed * shift.to(hidden.dtype)
