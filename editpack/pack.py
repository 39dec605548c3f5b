"""Edit packs: a versioned directory holding a weight delta as a PEFT LoRA adapter, a manifest and a card.

Format v1 (see ``docs/pack-format.md``)::

    editpack.json               manifest: format, name, version, base model + fingerprint, method and
                                hyper-parameters, facts, sha256 of every other file
    adapter_config.json         PEFT LoraConfig (one LoRA per edited module; rank_pattern/alpha_pattern keep
    adapter_model.safetensors   the scaling at exactly 1, so B @ A is the delta bit for bit)
    README.md                   the evaluation card (Hugging Face model card)

Only JSON and safetensors are read: nothing is ever unpickled. Saving is atomic (the whole directory appears
at once or not at all).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ._io import atomic_directory, atomic_write_json, sha256_file
from .errors import PackFormatError
from .facts import Fact
from .methods.delta import LowRankDelta, WeightDelta

FORMAT_VERSION = 1
MANIFEST = "editpack.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STATE = "method_state.safetensors"
MEMORY_WEIGHTS = "memory.safetensors"  # a memory pack's stored prompt embeddings (editpack.memory)
CARD = "README.md"
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?$")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def stored_dense(delta: LowRankDelta) -> bool:
    """Whether a delta is stored dense: its factors would not be smaller than the matrix itself."""
    rows, cols = delta.B.shape[0], delta.A.shape[1]
    return delta.rank * (rows + cols) >= rows * cols


def check_version(version: str) -> str:
    if not _SEMVER.match(version):
        raise PackFormatError(f"version {version!r} is not a semantic version like 1.0.0")
    return version


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "pack"


@dataclass
class BaseModel:
    """The model a pack was computed on."""

    id: str
    fingerprint: str
    model_type: str
    revision: str | None = None
    hub_id: str | None = None  # the upstream Hub repository, for the card's ``base_model``
    path: str | None = None  # where this machine loaded it from (PEFT's base_model_name_or_path)
    modules: dict[str, str] | None = None  # per-module fingerprints; ``fingerprint`` combines them
    embedding: str | None = None  # fingerprint of the input embedding: the identity check for quantized models

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class EditPack:
    """A weight-delta edit pack, in memory. :meth:`save` writes it; :meth:`load` reads and verifies one."""

    name: str
    version: str
    method: str
    hyperparameters: dict[str, Any]
    facts: list[Fact]
    base: BaseModel
    delta: WeightDelta
    fan_in_fan_out: bool = False
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).replace(microsecond=0).isoformat())
    parents: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    path: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    source: str | None = None  # ``user/name@commit`` when read in place from the Hugging Face cache (read-only)

    def __post_init__(self) -> None:
        check_version(self.version)
        if not self.name or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", self.name):
            raise PackFormatError(f"pack name {self.name!r} must be letters, digits, '.', '_' or '-'")

    kind = "weight"

    def storage_summary(self) -> str:
        """How the card describes the stored change."""
        stored = self.stored_factors()
        ranks = sorted({d.rank for d in stored.values()})
        dense = [m for m, d in stored.items() if stored_dense(d)]
        return (f"a PEFT LoRA adapter ({len(stored)} module{'s' if len(stored) != 1 else ''}: "
                + ", ".join(f"`{m}`" for m in sorted(stored)) + f"; rank {'/'.join(map(str, ranks))}"
                + (f"; {len(dense)} stored dense" if dense else "") + ")")

    # ------------------------------------------------------------------------------------------ PEFT form
    @property
    def modules(self) -> list[str]:
        return sorted(self.delta.modules)

    @property
    def ref(self) -> str:
        """``name@version``, how the pack is named in messages and lineage records."""
        return f"{self.name}@{self.version}"

    @property
    def adapter_name(self) -> str:
        """The name this pack's adapter gets inside a PEFT model (PEFT forbids dots)."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", f"{self.name}-v{self.version}")

    @property
    def content_id(self) -> str:
        """``sha256:<hex>`` of the delta itself (module names and factors), independent of files and metadata.

        Lineage records use it: a pack made on top of another names that parent by name, version and this id.
        """
        digest = hashlib.sha256()
        for key, tensor in sorted(self.adapter_state_dict().items()):
            digest.update(key.encode() + b"\0" + str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
        return "sha256:" + digest.hexdigest()

    def lineage_record(self, relation: str) -> dict[str, str]:
        """How another pack records this one as a parent: ``relation`` is ``onto`` or ``stacked``."""
        return {"name": self.name, "version": self.version, "content": self.content_id, "relation": relation}

    @property
    def requires(self) -> list[dict[str, Any]]:
        """The parents that must be applied before this pack (it was computed on a model carrying them)."""
        return [p for p in self.parents if p.get("relation", "onto") == "onto"]

    def stored_factors(self) -> dict[str, LowRankDelta]:
        """The factors as saved: low-rank while that is smaller than the dense matrix, else dense.

        A dense delta ΔW (out × in) is stored as the LoRA pair (I, ΔW) or (ΔW, I), whichever has the smaller
        rank min(out, in), so the adapter stays an ordinary PEFT LoRA while costing about a dense matrix.
        """
        return {name: LowRankDelta.from_dense(d.dense().float()) if stored_dense(d) else d
                for name, d in sorted(self.delta.modules.items())}

    def lora_config(self):
        """A PEFT ``LoraConfig`` whose LoRA layers reproduce the delta exactly (scaling alpha/r = 1)."""
        from peft import LoraConfig

        ranks = {name: d.rank for name, d in self.stored_factors().items()}
        first = ranks[self.modules[0]]
        return LoraConfig(
            r=first,
            lora_alpha=first,
            rank_pattern={re.escape(n): r for n, r in ranks.items()},
            alpha_pattern={re.escape(n): r for n, r in ranks.items()},
            target_modules=self.modules,
            lora_dropout=0.0,
            bias="none",
            fan_in_fan_out=self.fan_in_fan_out,
            task_type="CAUSAL_LM",
            base_model_name_or_path=self.base.path or self.base.id,
            inference_mode=True,
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA weights under PEFT's saved key names (no adapter name, as ``save_pretrained`` writes them)."""
        state = {}
        for name, d in self.stored_factors().items():
            state[f"base_model.model.{name}.lora_A.weight"] = d.A.detach().float().contiguous().cpu()
            state[f"base_model.model.{name}.lora_B.weight"] = d.B.detach().float().contiguous().cpu()
        return state

    # ------------------------------------------------------------------------------------------ manifest
    def manifest(self) -> dict[str, Any]:
        return {
            "format": "editpack",
            "format_version": FORMAT_VERSION,
            "kind": "weight",
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "base_model": self.base.to_dict(),
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            "delta": {
                "form": "lora",
                "content": self.content_id,
                "fan_in_fan_out": self.fan_in_fan_out,
                "modules": {n: {"rank": d.rank, "shape": [d.B.shape[0], d.A.shape[1]],
                                "form": "dense" if stored_dense(d) else "lora"}
                            for n, d in self.stored_factors().items()},
                "state": sorted(self.delta.state) or None,
            },
            "facts": [f.to_dict() for f in self.facts],
            "parents": self.parents,
            "evaluation": self.evaluation,
            "files": self.files,
        }

    # ------------------------------------------------------------------------------------------ disk
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the pack to ``directory`` atomically and return it; ``self.path``/``files`` are updated."""
        from .card import render_card

        directory = Path(directory)
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            save_file(self.adapter_state_dict(), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            if self.delta.state:
                save_file({k: v.detach().float().contiguous().cpu() for k, v in self.delta.state.items()},
                          str(tmp / STATE))
            self.lora_config().save_pretrained(str(tmp))
            (tmp / CARD).write_text(render_card(self), encoding="utf-8")
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
            self.files = files
            atomic_write_json(tmp / MANIFEST, self.manifest())
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, verify: bool = True) -> "EditPack":
        """Read a weight pack; with ``verify`` (the default) every file's sha256 must match the manifest.

        (:func:`load_pack` reads any kind of pack.)
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest.get("kind", "weight") != "weight":
            raise PackFormatError(f"{directory} is a {manifest.get('kind')} pack; read it with editpack.pack.load_pack")
        if verify:
            problems = verify_files(directory, manifest)
            if problems:
                raise PackFormatError(f"pack {directory} failed verification: " + "; ".join(problems))
        state = load_file(str(directory / ADAPTER_WEIGHTS))
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            match = _KEY.match(key)
            if not match:
                raise PackFormatError(f"{directory / ADAPTER_WEIGHTS}: unexpected tensor {key!r}")
            factors.setdefault(match["module"], {})[match["factor"]] = tensor
        delta = WeightDelta()
        for module, pair in factors.items():
            if set(pair) != {"A", "B"}:
                raise PackFormatError(f"{directory}: module {module} lacks lora_A or lora_B")
            delta.modules[module] = LowRankDelta(B=pair["B"], A=pair["A"])
        if sorted(delta.modules) != sorted(manifest["delta"]["modules"]):
            raise PackFormatError(f"{directory}: adapter modules differ from those the manifest lists")
        if manifest["delta"].get("state"):
            if STATE not in (manifest.get("files") or {}):
                raise PackFormatError(f"{directory}: the manifest lists method state but not {STATE}")
            delta.state = load_file(str(directory / STATE))
        return cls(
            name=manifest["name"],
            version=manifest["version"],
            method=manifest["method"],
            hyperparameters=manifest["hyperparameters"],
            facts=[Fact.from_dict(f, where=f"{directory} fact {i}") for i, f in enumerate(manifest["facts"])],
            base=BaseModel(**manifest["base_model"]),
            delta=delta,
            fan_in_fan_out=manifest["delta"].get("fan_in_fan_out", False),
            created=manifest["created"],
            parents=manifest.get("parents") or [],
            evaluation=manifest.get("evaluation"),
            path=directory,
            files=manifest.get("files") or {},
        )


def read_manifest(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise PackFormatError(f"{directory} is not a pack directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise PackFormatError(f"{directory} holds no {MANIFEST}; is it an editpack pack?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PackFormatError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != "editpack":
        raise PackFormatError(f"{path} is not an editpack manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PackFormatError(f"{path} has format_version {manifest.get('format_version')}; this editpack reads "
                              f"{FORMAT_VERSION} (upgrade editpack)")
    return manifest


REQUIRED_FILES = {"weight": (ADAPTER_CONFIG, ADAPTER_WEIGHTS), "memory": (MEMORY_WEIGHTS,)}


def load_pack(directory: str | Path, *, verify: bool = True):
    """Read a pack of any kind: an :class:`EditPack` (weights) or a ``MemoryPack`` (``editpack.memory``)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("kind", "weight") == "weight":
        return EditPack.load(directory, verify=verify)
    if verify:
        problems = verify_files(directory, manifest)
        if problems:
            raise PackFormatError(f"pack {directory} failed verification: " + "; ".join(problems))
    if manifest["kind"] == "memory":
        from .memory import MemoryPack

        return MemoryPack.from_manifest(directory, manifest)
    raise PackFormatError(f"{directory}: unknown pack kind {manifest['kind']!r} (upgrade editpack)")


def verify_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with the pack's files (missing, altered, or unlisted); empty when all hashes match."""
    problems = []
    listed = manifest.get("files") or {}
    for required in REQUIRED_FILES.get(manifest.get("kind", "weight"), ()):
        if required not in listed:
            problems.append(f"{required} is not listed in the manifest")
    for name, expected in sorted(listed.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name} does not match its sha256 in the manifest")
    return problems
