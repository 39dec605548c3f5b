"""The manifest every artifact holds (``editpack.json``): names, versions, the shape checks of reading it, the
file names it may list and the digests it records. Nothing here knows the kinds of artifact."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from ..errors import PackFormatError

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
    notes = manifest.get("notes")
    if notes is not None and (not isinstance(notes, list) or not all(isinstance(n, str) for n in notes)):
        raise PackFormatError(f"{path}: field 'notes' must be a list of texts")
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
