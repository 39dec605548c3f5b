"""The memory pack artifact: stored facts, their prompt embeddings (``memory.safetensors``) and the calibrated
threshold; :meth:`MemoryPack.with_facts` grows or shrinks it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from ..._io import read_safetensors, write_safetensors
from ...errors import PackFormatError
from ...facts import Fact, fact_key, normal_text
from ..artifact import Artifact, register_kind
from ..manifest import MANIFEST, content_digest, section
from .encoder import SentenceEncoder
from .scope import Scope, calibrate_facts

MEMORY_WEIGHTS = "memory.safetensors"


# ---------------------------------------------------------------------------------------------- the pack
@register_kind
@dataclass(kw_only=True)
class MemoryPack(Artifact):
    """A memory pack in memory; :meth:`save` writes it, :meth:`load` reads and verifies one."""

    keys: torch.Tensor  # (n facts, d) normalised embeddings of the facts' edit prompts
    threshold: float
    method: str = "serac"

    kind: ClassVar[str] = "memory"
    payload_files: ClassVar[tuple[str, ...]] = (MEMORY_WEIGHTS,)
    card_tag: ClassVar[str] = "memory"
    routes_text: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keys.ndim != 2 or self.keys.shape[0] != len(self.facts):
            raise PackFormatError(f"memory pack {self.name}: {tuple(self.keys.shape)} keys for {len(self.facts)} facts")

    @property
    def content_id(self) -> str:
        return content_digest([json.dumps([f.to_dict() for f in self.facts], sort_keys=True).encode(),
                               self.keys.float().contiguous().numpy().tobytes(), repr(self.threshold).encode()])

    @property
    def requires(self) -> list[dict[str, Any]]:
        return []  # generation is routed; no weights depend on another pack

    def parts(self) -> dict[str, str]:
        return {"memory": f"{len(self.facts)} keys, threshold {self.threshold}"}

    @property
    def scope(self) -> Scope:
        return Scope.of(self.hyperparameters)

    def storage_summary(self) -> str:
        return (f"a memory of {len(self.facts)} fact{'s' if len(self.facts) != 1 else ''} with a MiniLM scope "
                f"classifier (cosine ≥ {self.threshold}"
                + (", subject named" if self.scope.require_subject else "")
                + (f", relation within {self.scope.relation_margin}" if self.scope.require_subject
                   and self.scope.relation_margin is not None else "")
                + f"; route `{self.hyperparameters.get('route', 'context')}`); the model's weights are untouched")

    # -------------------------------------------------------------------------------------- edits
    def with_facts(self, *, add: Sequence[Fact] = (), remove: Sequence[str] = (), version: str,
                   encoder: "SentenceEncoder | None" = None, recalibrate: bool = True) -> "MemoryPack":
        """A new version with ``add`` appended (replacing facts about the same subject and relation) and the
        facts whose subject is in ``remove`` dropped; the threshold is recalibrated on the result."""
        gone = {normal_text(s) for s in remove}
        missing = sorted(gone - {normal_text(f.subject) for f in self.facts})
        if missing:
            raise PackFormatError(f"{self.ref} holds no fact about {missing}")
        replaced = {fact_key(f) for f in add}
        kept = [i for i, f in enumerate(self.facts) if normal_text(f.subject) not in gone and fact_key(f) not in replaced]
        facts = [self.facts[i] for i in kept] + list(add)
        if not facts:
            raise PackFormatError(f"removing {sorted(gone)} would leave {self.ref} empty")
        scope = self.scope
        if add or (recalibrate and scope.threshold is None):
            encoder = encoder or SentenceEncoder()
        keys = torch.cat([self.keys[kept], encoder.encode([f.text for f in add])]) if add else self.keys[kept]
        threshold = (calibrate_facts(encoder, facts, keys, scope) if recalibrate and scope.threshold is None
                     else self.threshold)
        return MemoryPack(name=self.name, version=version, hyperparameters=self.hyperparameters, facts=facts,
                          base=self.base, keys=keys, threshold=threshold, method=self.method,
                          parents=[self.lineage_record("extends")])

    # -------------------------------------------------------------------------------------- disk
    def payload_manifest(self) -> dict[str, Any]:
        return {"memory": {"threshold": self.threshold, "n_facts": len(self.facts), "dim": int(self.keys.shape[1]),
                           "content": self.content_id}}

    def write_payload(self, directory: Path) -> None:
        write_safetensors({"keys": self.keys.float().contiguous()}, directory / MEMORY_WEIGHTS)

    @classmethod
    def from_manifest(cls, directory: Path, manifest: dict[str, Any]) -> "MemoryPack":
        memory = section(manifest, "memory", directory)
        tensors = read_safetensors(directory / MEMORY_WEIGHTS)
        keys = tensors.get("keys")
        if keys is None or keys.ndim != 2 or not keys.is_floating_point():
            raise PackFormatError(f"{directory / MEMORY_WEIGHTS}: expected one floating-point matrix 'keys'")
        if not torch.isfinite(keys).all():
            raise PackFormatError(f"{directory / MEMORY_WEIGHTS}: the keys hold NaN or infinite values")
        threshold = memory.get("threshold")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            raise PackFormatError(f"{directory / MANIFEST}: memory.threshold must be a number")
        pack = cls(**cls.header_fields(directory, manifest), keys=keys.float(), threshold=float(threshold))
        if memory.get("content") != pack.content_id:
            raise PackFormatError(f"{directory}: the memory's content is not the memory.content the manifest records")
        return pack
