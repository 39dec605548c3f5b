"""What every editpack artifact shares: the manifest header, versioning, lineage, the save skeleton, verification.

An artifact is a versioned directory: ``editpack.json`` (the manifest), the kind's own payload files and
``README.md`` (the card). Kinds (``weight`` packs in :mod:`editpack.pack`, ``memory`` packs in
:mod:`editpack.memory`) subclass :class:`Artifact` and register with :func:`register_kind`;
:func:`load_pack` reads any registered kind. Kind-specific behaviour lives in class attributes and methods
(``holds_weights``, ``mergeable``, ``scores_logits``, ``payload_files``, …), never in checks of the kind's name.

Loading is defensive: the manifest's shape is checked, every file it lists must be a plain name inside the
directory (no ``/``, ``..``, absolute paths, hidden names), no file in the directory may be a symbolic link, and
each listed file must match its sha256. Only JSON and safetensors are read; nothing is unpickled. Saving is
atomic (the directory appears whole or not at all) and gives ordinary permissions. Nothing an artifact holds
names a local path.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

from .._io import atomic_directory, atomic_write_json, sha256_file
from ..errors import PackFormatError
from ..facts import Fact

FORMAT_VERSION = 1
MANIFEST = "editpack.json"
CARD = "README.md"
MERGED_RECORD = "editpack_applied.json"  # what a merged model folder written by editpack holds
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _SEMVER.match(version):
        raise PackFormatError(f"version {version!r} is not a semantic version like 1.0.0")
    return version


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 96:
        raise PackFormatError(f"pack name {name!r} must be letters, digits, '.', '_' or '-' (at most 96, starting "
                              "with a letter or digit)")
    return name


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "pack"


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------------------------------- base model
@dataclass
class BaseModel:
    """The model an artifact was computed on. Every field is portable: no local path is ever recorded."""

    id: str  # a built-in name, a Hub id, or the name (not the path) of a local folder or GGUF file
    fingerprint: str
    model_type: str
    revision: str | None = None
    hub_id: str | None = None  # the upstream Hub repository (the card's ``base_model``; PEFT's base name)
    modules: dict[str, str] | None = None  # per-module fingerprints; ``fingerprint`` combines them
    embedding: str | None = None  # fingerprint of the input embedding: the identity check for quantized models
    norms: dict[str, float] | None = None  # Frobenius norm of each edited module's original weight (the delta's scale)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "BaseModel":
        if not isinstance(data, dict):
            raise PackFormatError(f"{where}: base_model must be an object")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}  # ``path`` of format-1 packs before 0.4 is dropped
        for key in ("id", "model_type"):
            if not isinstance(values.get(key), str):
                raise PackFormatError(f"{where}: base_model.{key} is missing or not text")
        values.setdefault("fingerprint", "")
        modules = values.get("modules")
        if modules is not None:
            if not isinstance(modules, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in modules.items()):
                raise PackFormatError(f"{where}: base_model.modules must map module names to fingerprints")
            from ..model.fingerprint import combine

            if modules and values["fingerprint"] != combine(modules):
                raise PackFormatError(
                    f"{where}: base_model.fingerprint {str(values['fingerprint'])[:23]}… is not the combination of "
                    f"its module fingerprints ({combine(modules)[:23]}…): the manifest was altered")
        norms = values.get("norms")
        if norms is not None and (not isinstance(norms, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")
                for k, v in norms.items())):
            raise PackFormatError(f"{where}: base_model.norms must map module names to positive finite numbers")
        return cls(**values)

    @property
    def peft_name(self) -> str:
        """What PEFT's ``base_model_name_or_path`` says: the Hub id where there is one, else the portable id."""
        return self.hub_id or self.id


def describe_base(model, modules: Iterable[str]) -> BaseModel:
    """What an artifact records about the model it was computed on (original weights, before any pack)."""
    from ..model.arch import spec_for
    from ..model.fingerprint import combine, materialized, memo_fingerprint, module_fingerprints, unwrap, weight_norms
    from ..model.loading import BUILTINS, ModelRef

    model = unwrap(model)
    ref: ModelRef | None = getattr(model, "editpack_ref", None)
    model_id = ref.id if ref else portable_id(getattr(model, "name_or_path", "") or "unknown")
    builtin = BUILTINS.get(model_id)
    hub_id = builtin.hub_id if builtin else (model_id if ref and ref.hub else None)
    modules = list(modules)
    fingerprints = module_fingerprints(model, modules) if modules else {}
    norms = weight_norms(model, modules)
    embed_name = spec_for(model).embed
    with materialized(model.get_submodule(embed_name)) as embed:
        embedding = memo_fingerprint(model, f"{embed_name}.weight", embed.weight)
    return BaseModel(
        id=model_id,
        fingerprint=combine(fingerprints) if fingerprints else "",
        modules=fingerprints or None,
        embedding=embedding,
        norms=norms or None,
        model_type=model.config.model_type,
        revision=ref.revision if ref else None,
        hub_id=hub_id,
    )


def portable_id(name: str) -> str:
    """A model name fit to record: a Hub id as is; of a local path only its last component."""
    text = str(name)
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not Path(text).exists():
        return text
    return Path(text).name or "unknown"


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
        """Template variables of the kind's own (the shared ones are filled in by :func:`editpack.card.render_card`)."""
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
        from .card import render_card

        directory = Path(directory)
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.write_payload(tmp)
            chart = None
            if self.evaluation:
                from .chart import CHART, summary_rows, write_chart

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


# ---------------------------------------------------------------------------------------------- reading
_HEADER_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "version": str, "kind": str, "created": str, "method": str, "base_model": dict,
    "hyperparameters": dict, "facts": list, "files": dict,
}


def _link_ok(path: Path, links_into: Path | None) -> bool:
    """A symbolic link is acceptable only inside the Hugging Face cache, pointing into the same repository's blobs."""
    if links_into is None:
        return False
    try:
        return path.resolve(strict=True).is_relative_to(links_into.resolve())
    except (OSError, RuntimeError):
        return False


def read_manifest(directory: str | Path, *, links_into: Path | None = None) -> dict[str, Any]:
    """The manifest of ``directory``, its shape checked (errors name the file and the field).

    ``links_into``: a pack read in place from the Hugging Face cache, whose files are links to blobs there.
    """
    directory = Path(directory)
    if directory.is_symlink() and not directory.is_dir():
        raise PackFormatError(f"{directory} is a dangling symbolic link, not a pack directory")
    if not directory.is_dir():
        raise PackFormatError(f"{directory} is not a pack directory")
    path = directory / MANIFEST
    if path.is_symlink() and not _link_ok(path, links_into):
        raise PackFormatError(f"{path} is a symbolic link; a pack holds its own files only")
    if not path.is_file():
        raise PackFormatError(f"{directory} holds no {MANIFEST}; is it an editpack pack?")
    return parse_manifest(path.read_bytes(), path)


def parse_manifest(data: bytes, path: Path | str) -> dict[str, Any]:
    """A manifest's bytes as a shape-checked dict; ``path`` names it in errors."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PackFormatError(f"{path} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise PackFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "editpack":
        raise PackFormatError(f"{path} is not an editpack manifest (expected an object with \"format\": \"editpack\")")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PackFormatError(f"{path} has format_version {manifest.get('format_version')!r}; this editpack reads "
                              f"{FORMAT_VERSION} (upgrade editpack)")
    manifest.setdefault("kind", "weight")
    for key, kind in _HEADER_TYPES.items():
        if not isinstance(manifest.get(key), kind):
            raise PackFormatError(f"{path}: field {key!r} is missing or not {_type_name(kind)}")
    if manifest.get("parents") is not None and not isinstance(manifest["parents"], list):
        raise PackFormatError(f"{path}: field 'parents' must be a list")
    if manifest.get("evaluation") is not None and not isinstance(manifest["evaluation"], dict):
        raise PackFormatError(f"{path}: field 'evaluation' must be an object")
    for name, digest in manifest["files"].items():
        check_file_name(name, path)
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise PackFormatError(f"{path}: files[{name!r}] is not a sha256 hex digest")
    return manifest


def _type_name(kind) -> str:
    return {str: "text", dict: "an object", list: "a list"}.get(kind, getattr(kind, "__name__", str(kind)))


def check_file_name(name: str, where: Path | str) -> str:
    """A file name a manifest may list: a plain name inside the pack (no folders, ``..``, absolute or hidden)."""
    if (not isinstance(name, str) or not name or name != name.strip() or "/" in name or "\\" in name
            or name.startswith(".") or "\0" in name or name == MANIFEST or len(name) > 128):
        raise PackFormatError(f"{where}: {name!r} is not a plain file name inside the pack (no folders, '..', "
                              "absolute paths or hidden files)")
    return name


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


def section(manifest: dict[str, Any], key: str, directory: Path) -> dict[str, Any]:
    """A kind's manifest section, which must be an object."""
    value = manifest.get(key)
    if not isinstance(value, dict):
        raise PackFormatError(f"{directory / MANIFEST}: field {key!r} is missing or not an object")
    return value


def content_digest(parts: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return "sha256:" + digest.hexdigest()
