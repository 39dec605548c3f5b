"""Packs on the Hugging Face Hub: push a version, pull one (verified), list versions.

A pack lives in a model repository; each version is one commit holding the pack's files, tagged ``v<version>``.
Everything goes through ``huggingface_hub`` (``HfApi.create_repo``/``create_commit``/``create_tag``,
``list_repo_tree``, ``hf_hub_download`` and its cache), so authentication, endpoints and offline mode follow it:

- the token comes from ``token=``, ``HF_TOKEN`` or the login cache (``hf auth login``); editpack never prints,
  logs or stores it;
- the endpoint comes from ``endpoint=`` or ``HF_ENDPOINT`` (read at call time);
- with ``HF_HUB_OFFLINE=1``, versions already pulled are served from the Hugging Face cache.

A pull reads the manifest first and then downloads only the files it lists (plain names, regular files in the
repository, each under a size cap); nothing else in a repository is fetched or read.

A tag is immutable: pushing a version that exists with other content is refused, pushing the same content again
does nothing. The tag is created only after the commit succeeded, so a failed push leaves no version behind, and
a retry after a failure between commit and tag tags the commit already made.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, hf_hub_download, scan_cache_dir
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from .._io import atomic_directory, check_output
from ..errors import EditpackError, PackFormatError
from ..packs.artifact import Artifact, load_pack, verify_files
from ..packs.manifest import MANIFEST, check_version, parse_manifest, read_manifest
from ..packs.statistics import StatsPack, install

_REFERENCE = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[^@\s]+))?$")
_SEMVER_TAG = re.compile(r"^v?(\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?)$")
TOKEN_HELP = "set HF_TOKEN or log in with `hf auth login`"


class HubError(EditpackError):
    """A Hub operation that could not be done (not found, not allowed, version exists, offline, ...)."""


@dataclass(frozen=True)
class HubReference:
    """``user/name`` with an optional revision: a version (``1.2.0`` or ``v1.2.0``), a branch or a commit."""

    repo_id: str
    revision: str | None = None

    @property
    def git_revision(self) -> str:
        """What to ask the Hub for: versions become their ``v`` tags; anything else is passed through."""
        if self.revision is None:
            return "main"
        match = _SEMVER_TAG.match(self.revision)
        return f"v{match[1]}" if match else self.revision

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_reference(text: str) -> HubReference | None:
    """``user/name[@revision]`` as a :class:`HubReference`; ``None`` when ``text`` is not of that form."""
    match = _REFERENCE.match(str(text))
    return HubReference(match["repo"], match["rev"]) if match else None


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    version: str
    tag: str
    commit: str
    created: bool  # False when this exact version was already there (nothing was done)


@dataclass(frozen=True)
class PackVersion:
    version: str
    tag: str
    commit: str
    date: str | None


def _endpoint(endpoint: str | None) -> str | None:
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def _api(token: str | None, endpoint: str | None):
    return HfApi(endpoint=_endpoint(endpoint), token=token)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_error(exc: Exception, reference: HubReference | str) -> HubError:
    """A clear message for huggingface_hub's errors (which never contain the token)."""
    if isinstance(exc, GatedRepoError):
        return HubError(f"{reference}: the repository is gated; request access on the Hub, then {TOKEN_HELP}")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, RepositoryNotFoundError) or status == 401:
        return HubError(f"{reference}: repository not found, or it is private and no valid token was given "
                        f"({TOKEN_HELP})")
    if status == 403:
        return HubError(f"{reference}: this token may not do that (read-only token, or not your namespace)")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{reference}: no such version, branch or commit (see `editpack versions`)")
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return HubError(f"{reference}: not in the local Hugging Face cache and the Hub cannot be reached "
                        "(offline mode or no connection); pull it once while online")
    return HubError(f"{reference}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _connection_error(exc: BaseException) -> bool:
    """No answer from the endpoint: the HTTP client's connect/timeout/transport errors (whichever client
    huggingface_hub uses) or an OSError."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(names & {"ConnectError", "ConnectionError", "ConnectTimeout",
                                                      "TimeoutException", "NetworkError", "TransportError"})


def _unreachable(exc: Exception, reference, endpoint: str) -> HubError:
    """No connection (requests' and httpx's errors are OSErrors or wrap them): say where and what to do."""
    return HubError(f"{reference}: the Hub at {endpoint} cannot be reached ({type(exc).__name__}); check HF_ENDPOINT "
                    "and the network, or set HF_HUB_OFFLINE=1 to use versions pulled before")


@contextlib.contextmanager
def _translated(reference, endpoint: str):
    """huggingface_hub's errors, and no answer from the endpoint, as one clear :class:`HubError`."""
    try:
        yield
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise _hub_error(exc, reference) from exc
    except Exception as exc:
        if not _connection_error(exc):
            raise
        raise _unreachable(exc, reference, endpoint) from exc


def _remote_manifest(api, repo_id: str, revision: str) -> dict[str, Any] | None:
    try:
        path = hf_hub_download(repo_id, MANIFEST, revision=revision, endpoint=api.endpoint, token=api.token)
    except EntryNotFoundError:
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _same_content(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    return a is not None and a == b


# ---------------------------------------------------------------------------------------------- push
def push(pack: Artifact | str | Path, repo_id: str, *, private: bool = False, message: str | None = None,
         token: str | None = None, endpoint: str | None = None) -> PushResult:
    """Upload ``pack`` to the model repository ``repo_id`` in one commit and tag it ``v<version>``.

    The repository is created if needed (``private`` then applies). Returns what was done; raises
    :class:`HubError` if the version exists there with different content.
    """
    if parse_reference(repo_id) is None or "@" in repo_id:
        raise HubError(f"{repo_id!r} is not a repository id like user/name")
    with tempfile.TemporaryDirectory(prefix="editpack-push-") as scratch:
        if hasattr(pack, "save") and pack.path is None:
            pack.save(Path(scratch) / "pack")
        directory = Path(pack.path if hasattr(pack, "save") else pack)
        local = load_pack(directory)  # verifies every file against the manifest
        manifest = read_manifest(directory)
        tag = f"v{local.version}"
        api = _api(token, endpoint)
        with _translated(repo_id, api.endpoint):
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            refs = api.list_repo_refs(repo_id)
            tags = {t.name: t.target_commit for t in refs.tags}
            if tag in tags:
                if _same_content(_remote_manifest(api, repo_id, tags[tag]), manifest):
                    return PushResult(repo_id, local.version, tag, tags[tag], created=False)
                raise HubError(f"{repo_id} already has version {local.version} ({tag}) with different content; "
                               "versions are immutable: give this pack a new version (editpack edit --version, or "
                               "save it with another version) and push that")
            head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
            if head is not None and _same_content(_remote_manifest(api, repo_id, head), manifest):
                commit = head  # an earlier push committed these files but failed before tagging
            else:
                names = [MANIFEST, *sorted(manifest["files"])]
                ops: list = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(directory / n)) for n in names]
                if head is not None:
                    stale = set(api.list_repo_files(repo_id, revision=head)) - set(names) - {".gitattributes"}
                    ops += [CommitOperationDelete(path_in_repo=p) for p in sorted(stale)]
                info = api.create_commit(
                    repo_id, ops, commit_message=message or f"{local.name} {local.version}",
                    commit_description=f"editpack {local.method} pack, {len(local.facts)} fact(s)",
                    parent_commit=head,
                )
                commit = info.oid
            api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"{local.name} {local.version}")
    return PushResult(repo_id, local.version, tag, commit, created=True)


# ---------------------------------------------------------------------------------------------- pull
#: The largest file a pull downloads unless told otherwise (``max_file_bytes=``, ``EDITPACK_MAX_FILE_BYTES``).
DEFAULT_MAX_FILE_BYTES = 8 * 2**30
MAX_MANIFEST_BYTES = 16 * 2**20


def _max_file_bytes(value: int | None) -> int:
    if value is not None:
        return int(value)
    env = os.environ.get("EDITPACK_MAX_FILE_BYTES")
    if env:
        try:
            return int(env)
        except ValueError:
            raise HubError(f"EDITPACK_MAX_FILE_BYTES must be a number of bytes, not {env!r}") from None
    return DEFAULT_MAX_FILE_BYTES


def pull(reference: str | HubReference, output: str | Path | None = None, *, overwrite: bool = False,
         token: str | None = None, endpoint: str | None = None, max_file_bytes: int | None = None) -> Artifact:
    """Download a pack version through the Hugging Face cache and verify every file against its manifest.

    ``reference`` is ``user/name[@version|@branch|@commit]`` (the default is ``main``). The manifest is read
    first; then only the files it lists are downloaded, each a plain name inside the pack, a regular file in the
    repository and at most ``max_file_bytes`` (default 8 GiB, or ``EDITPACK_MAX_FILE_BYTES``). Nothing else in
    the repository is fetched or read. With ``output`` the verified files are also copied there (atomically;
    nothing is written if anything is refused). Without it the pack is read in place from the cache (read-only).
    Works offline for versions already pulled. Key statistics pulled so are also kept in the local statistics
    cache, where later edits of the model they were made for find them.
    """
    ref = reference if isinstance(reference, HubReference) else parse_reference(reference)
    if ref is None:
        raise HubError(f"{reference!r} is not a Hub pack reference like user/name@1.0.0")
    if output is not None:
        check_output(output, overwrite=overwrite)
    cap = _max_file_bytes(max_file_bytes)
    offline = _offline()
    api = _api(token, endpoint)
    with _translated(ref, api.endpoint):
        if offline:
            commit = ref.git_revision
            sizes = None
        else:
            commit = api.model_info(ref.repo_id, revision=ref.git_revision).sha
            sizes = _file_sizes(api, ref, commit)
            manifest_size = sizes.get(MANIFEST)
            if manifest_size is None:
                raise HubError(f"{ref} does not hold an editpack pack (no {MANIFEST} at commit {commit[:12]})")
            if manifest_size > MAX_MANIFEST_BYTES:
                raise HubError(f"{ref}: {MANIFEST} is {manifest_size:,} bytes, more than a manifest can be "
                               f"({MAX_MANIFEST_BYTES:,}); refusing it")
        common = dict(repo_id=ref.repo_id, endpoint=api.endpoint, token=token, local_files_only=offline)
        # By the named revision, so that the cache records it (offline pulls of v1.0.0 find it again).
        manifest_path = Path(hf_hub_download(filename=MANIFEST, revision=ref.git_revision, **common))
        folder = manifest_path.parent
        if not offline and folder.name != commit:
            raise HubError(f"{ref} moved to another commit while it was being pulled; pull again")
        download = dict(common, revision=folder.name)
        try:
            manifest = parse_manifest(manifest_path.read_bytes(), f"{ref} {MANIFEST}")
        except PackFormatError as exc:
            raise HubError(f"{ref} does not hold an editpack pack: {exc}") from exc
        listed = sorted(manifest["files"])  # plain names inside the pack: parse_manifest checked each
        if sizes is not None:
            for name in listed:
                if name not in sizes:
                    raise PackFormatError(f"{ref}: the manifest lists {name}, which is not a regular file in the "
                                          f"repository at commit {commit[:12]} (missing, a folder or a link); "
                                          "nothing was downloaded")
                if sizes[name] > cap:
                    raise PackFormatError(f"{ref}: {name} is {sizes[name]:,} bytes, over the {cap:,}-byte limit per "
                                          "file; nothing was downloaded (raise it with max_file_bytes= or "
                                          "EDITPACK_MAX_FILE_BYTES if you expect a file this large)")
        for name in listed:
            hf_hub_download(filename=name, **download)
    cache_repo = folder.parent.parent  # <cache>/models--user--name: snapshots link into its blobs
    problems = verify_files(folder, manifest, links_into=cache_repo)
    if problems:
        _evict(ref.repo_id, folder.name, cache_repo.parent)
        raise PackFormatError(f"{ref} (commit {folder.name[:12]}) failed verification, nothing was kept: "
                              + "; ".join(problems))
    if output is None:
        pack = load_pack(folder, verify=False, links_into=cache_repo)
        pack.source = f"{ref.repo_id}@{folder.name}"
    else:
        with atomic_directory(Path(output), overwrite=overwrite) as tmp:
            for name in [MANIFEST, *listed]:
                shutil.copyfile(folder / name, tmp / name)  # follows the cache's links to the blobs: plain files
        pack = load_pack(Path(output))
    if isinstance(pack, StatsPack):  # key statistics: kept in the local cache, where later edits look for them
        install(pack)
    return pack


def _file_sizes(api, ref: HubReference, commit: str) -> dict[str, int]:
    """Sizes of the regular files in the repository at ``commit`` (folders and links are left out)."""
    return {entry.path: int(entry.size) for entry in api.list_repo_tree(ref.repo_id, revision=commit, recursive=True)
            if isinstance(entry, RepoFile)}


def scan_cache(cache_dir: str | Path | None = None):
    """The Hugging Face cache scanned (``cache_dir``, else where huggingface_hub points now), or ``None`` when
    there is none to scan. ``scan_cache_dir``'s own default is read when huggingface_hub is first imported, so a
    cache moved later (``HF_HUB_CACHE`` set in the process) would be missed."""
    try:
        return scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - no cache yet, or one we cannot read: nothing to see
        return None


def _evict(repo_id: str, commit: str, cache_dir: Path) -> None:
    """Drop a revision that failed verification from the cache it was downloaded into, so it is not served again."""
    cache = scan_cache(cache_dir)
    if cache is None:
        return
    hashes = [r.commit_hash for repo in cache.repos if repo.repo_id == repo_id for r in repo.revisions
              if r.commit_hash == commit]
    if hashes:
        cache.delete_revisions(*hashes).execute()


# ---------------------------------------------------------------------------------------------- versions
def versions(repo_id: str, *, token: str | None = None, endpoint: str | None = None) -> list[PackVersion]:
    """The versions of the pack in ``repo_id`` (its ``v<semver>`` tags), oldest first, with dates and commits."""
    api = _api(token, endpoint)
    with _translated(repo_id, api.endpoint):
        refs = api.list_repo_refs(repo_id)
        dates = {c.commit_id: c.created_at.isoformat() for c in api.list_repo_commits(repo_id)}
        out = []
        for tag in refs.tags:
            match = _SEMVER_TAG.match(tag.name)
            if not match:
                continue
            if tag.target_commit not in dates:  # a tag on a commit no longer on main
                history = api.list_repo_commits(repo_id, revision=tag.name)
                dates[tag.target_commit] = history[0].created_at.isoformat() if history else None
            out.append(PackVersion(match[1], tag.name, tag.target_commit, dates.get(tag.target_commit)))
    return sorted(out, key=lambda v: _semver_key(v.version))


def _semver_key(version: str) -> tuple:
    check_version(version)
    core, _, pre = version.partition("-")
    return (*(int(x) for x in core.split(".")), pre == "", pre)


# ---------------------------------------------------------------------------------------------- resolving
def resolve_pack(reference: Any, *, token: str | None = None, endpoint: str | None = None) -> Artifact:
    """The pack ``reference`` names: an :class:`EditPack`, a local pack directory, or ``user/name[@version]``.

    A local directory wins over a Hub reference of the same spelling.
    """
    if isinstance(reference, Artifact):  # a pack object of any kind
        return reference
    path = Path(str(reference))
    if path.exists():
        return load_pack(path)
    hub = parse_reference(str(reference))
    if hub is None:
        raise PackFormatError(f"{reference!r} is neither a pack directory nor a Hub reference like user/name@1.0.0")
    return pull(hub, token=token, endpoint=endpoint)
