"""What every editpack artifact shares: the manifest header, versioning, lineage, the save skeleton, verification.

An artifact is a versioned directory: ``editpack.json`` (the manifest), the kind's own payload files and
``README.md`` (the card). Kinds (``weight`` packs in :mod:`editpack.packs.weights`, ``memory`` packs in
:mod:`editpack.packs.memory`) subclass :class:`Artifact` and register with :func:`register_kind`;
:func:`load_pack` reads any registered kind. Kind-specific behaviour lives in class attributes and methods
(``holds_weights``, ``mergeable``, ``scores_logits``, ``payload_files``, …), never in checks of the kind's name.

Loading is defensive: the manifest's shape is checked, every file it lists must be a plain name inside the
directory (no ``/``, ``..``, absolute paths, hidden names), no file in the directory may be a symbolic link, and
each listed file must match its sha256. Only JSON and safetensors are read; nothing is unpickled. Saving is
atomic (the directory appears whole or not at all) and gives ordinary permissions. Nothing an artifact holds
names a local path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from .._io import atomic_directory, atomic_write_json, sha256_file
from ..errors import PackFormatError
from ..facts import Fact
from .base_model import BaseModel
from .card import render_card
from .chart import CHART, summary_rows, write_chart
from .manifest import CARD, FORMAT_VERSION, MANIFEST, _link_ok, check_name, check_version, now, read_manifest

# ---------------------------------------------------------------------------------------------- kinds
KINDS: dict[str, type["Artifact"]] = {}


def register_kind(cls: type["Artifact"]) -> type["Artifact"]:
    if cls.kind in KINDS and KINDS[cls.kind] is not cls:
        raise ValueError(f"artifact kind {cls.kind!r} is registered twice")
    KINDS[cls.kind] = cls
    return cls


@dataclass(kw_only=True)
class Artifact(ABC):
    """Fields, identity, lineage and disk life cycle shared by every kind (see the module docstring)."""

    name: str
    version: str
    method: str
    hyperparameters: dict[str, Any]
    facts: list[Fact]
    base: BaseModel
    created: str = field(default_factory=now)
    parents: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    path: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    source: str | None = None  # ``user/name@commit`` when read in place from the Hugging Face cache (read-only)
    #: What a reader must know before using it (an experimental method's measured caveat); shown on the card.
    notes: list[str] = field(default_factory=list)

    kind: ClassVar[str]
    #: Files the kind's payload always has (besides the manifest and the card).
    payload_files: ClassVar[tuple[str, ...]] = ()
    #: Holds a weight delta: edits computed on a model carrying it depend on it (lineage).
    holds_weights: ClassVar[bool] = False
    #: Can be folded into a model's weights (``apply(merge=True)``, ``editpack apply -o``).
    mergeable: ClassVar[bool] = False
    #: Changes the model's logits, so teacher-forced protocols can score it (else only generation is routed).
    scores_logits: ClassVar[bool] = False
    #: Applied by wrapping model layers with a forward hook (codebooks); the weights stay untouched.
    hooks_modules: ClassVar[bool] = False
    #: The pack is an ordinary PEFT adapter directory.
    is_peft_adapter: ClassVar[bool] = False
    #: The card's tag for the payload.
    card_tag: ClassVar[str] = ""
    #: Can be applied to a model (``editpack.apply``); a trained editor cannot.
    appliable: ClassVar[bool] = True
    #: Routes prompts by their text and keeps its facts plain (memory packs): chat form reaches it through the
    #: user's turn, never through its facts (``editpack.chat``).
    routes_text: ClassVar[bool] = False
    #: The card template (in ``editpack.cards``) and what the kind adds to its variables (:meth:`card_context`).
    card_template: ClassVar[str] = "pack_card.md"

    def card_context(self) -> dict[str, Any]:
        """Template variables of the kind's own (the shared ones are filled in by :func:`editpack.packs.card.render_card`)."""
        return {}

    def __post_init__(self) -> None:
        check_version(self.version)
        check_name(self.name)

    # -------------------------------------------------------------------------------------- identity
    @property
    def ref(self) -> str:
        """``name@version``, how the artifact is named in messages and lineage records."""
        return f"{self.name}@{self.version}"

    @property
    @abstractmethod
    def content_id(self) -> str:
        """``sha256:<hex>`` of the payload itself, independent of files and metadata."""
    @property
    def modules(self) -> list[str]:
        """The model modules whose weights the artifact changes (none for a memory)."""
        return []

    def parts(self) -> dict[str, str]:
        """What the payload holds, part by part (``{module: "rank 2"}``, …), for logs and diffs."""
        return {}

    @property
    def base_modules(self) -> list[str]:
        """The modules whose original weights the artifact was computed for (its fingerprint covers them)."""
        return self.modules

    def module_shape(self, module: str) -> tuple[int, int]:
        """``(out_features, in_features)`` the artifact expects of ``module`` (checked on quantized models)."""
        raise PackFormatError(f"{self.ref} expects nothing of {module}")

    def lineage_record(self, relation: str) -> dict[str, str]:
        """How another artifact records this one as a parent (``onto``, ``stacked`` or ``extends``)."""
        return {"name": self.name, "version": self.version, "content": self.content_id, "relation": relation}

    @property
    def requires(self) -> list[dict[str, Any]]:
        """The parents that must be applied before this artifact (it was computed on a model carrying them)."""
        return [p for p in self.parents if p.get("relation", "onto") == "onto"]

    @abstractmethod
    def storage_summary(self) -> str:
        """How the card and the CLI describe the stored change."""
    def with_facts(self, *, add: Sequence[Fact] = (), remove: Sequence[str] = (), version: str) -> "Artifact":
        """A new version with facts added or (by subject) removed, for kinds that grow by facts alone."""
        raise PackFormatError(f"{self.ref} is a {self.kind} pack: its facts cannot be added or dropped one by one; "
                              "edit again (editpack.extend / edit --onto) instead")

    # -------------------------------------------------------------------------------------- manifest
    @abstractmethod
    def payload_manifest(self) -> dict[str, Any]:
        """The kind's own manifest section(s), merged into the shared header."""
    def manifest(self) -> dict[str, Any]:
        return {
            "format": "editpack",
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "base_model": self.base.to_dict(),
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            **self.payload_manifest(),
            "facts": [f.to_dict() for f in self.facts],
            "parents": self.parents,
            "evaluation": self.evaluation,
            **({"notes": self.notes} if self.notes else {}),
            "files": self.files,
        }

    @staticmethod
    def header_fields(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """The shared constructor arguments from a (shape-checked) manifest."""
        return dict(
            name=manifest["name"], version=manifest["version"], method=manifest["method"],
            hyperparameters=manifest["hyperparameters"],
            facts=[Fact.from_dict(f, where=f"{directory / MANIFEST} fact {i}") for i, f in enumerate(manifest["facts"])],
            base=BaseModel.from_dict(manifest["base_model"], where=str(directory / MANIFEST)),
            created=manifest["created"], parents=manifest.get("parents") or [],
            evaluation=manifest.get("evaluation"), path=directory, files=manifest.get("files") or {},
            notes=list(manifest.get("notes") or []),
        )

    # -------------------------------------------------------------------------------------- disk
    @abstractmethod
    def write_payload(self, directory: Path) -> None:
        """Write the kind's payload files into ``directory`` (a fresh temporary directory)."""
    @classmethod
    @abstractmethod
    def from_manifest(cls, directory: Path, manifest: dict[str, Any]) -> "Artifact":
        """Read the payload of a verified directory and check it against the manifest."""
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the artifact to ``directory`` atomically and return it; ``self.path``/``files`` are updated.

        ``overwrite`` replaces only a directory that holds an editpack artifact (or a model folder editpack wrote).
        """
        directory = Path(directory)
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.write_payload(tmp)
            chart = None
            if self.evaluation:

                chart = CHART if write_chart(summary_rows(self.evaluation), tmp / CHART, f"{self.name} {self.version}") else None
            (tmp / CARD).write_text(render_card(self, chart=chart), encoding="utf-8")
            self.files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
            atomic_write_json(tmp / MANIFEST, self.manifest())
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, verify: bool = True) -> "Artifact":
        """Read and (by default) verify an artifact of this kind; :func:`load_pack` reads any kind."""
        pack = load_pack(directory, verify=verify)
        if not isinstance(pack, cls):
            raise PackFormatError(f"{directory} is a {pack.kind} pack, not a {cls.kind} pack; read it with "
                                  "editpack.load_pack")
        return pack


def verify_files(directory: str | Path, manifest: dict[str, Any], *, links_into: Path | None = None) -> list[str]:
    """Problems with the pack's files (missing, altered, symbolic links); empty when all hashes match."""
    directory = Path(directory)
    problems = []
    listed = manifest.get("files") or {}
    cls = KINDS.get(manifest.get("kind", "weight"))
    for required in cls.payload_files if cls else ():
        if required not in listed:
            problems.append(f"{required} is not listed in the manifest")
    entries = sorted(directory.iterdir()) if links_into is None else [directory / n for n in [MANIFEST, *listed]]
    for entry in entries:
        if entry.is_symlink() and not _link_ok(entry, links_into):
            problems.append(f"{entry.name} is a symbolic link (a pack holds its own files only)")
    for name, expected in sorted(listed.items()):
        path = directory / name
        if path.is_symlink() and not _link_ok(path, links_into):
            continue  # reported above
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name} does not match its sha256 in the manifest")
    return problems


def load_pack(directory: str | Path, *, verify: bool = True, links_into: Path | None = None) -> Artifact:
    """Read an artifact of any registered kind; with ``verify`` (default) every file must match the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory, links_into=links_into)
    cls = KINDS.get(manifest["kind"])
    if cls is None:
        raise PackFormatError(f"{directory}: unknown pack kind {manifest['kind']!r} (known: "
                              f"{', '.join(sorted(KINDS))}; upgrade editpack)")
    if verify:
        problems = verify_files(directory, manifest, links_into=links_into)
        if problems:
            raise PackFormatError(f"pack {directory} failed verification: " + "; ".join(problems))
    return cls.from_manifest(directory, manifest)
