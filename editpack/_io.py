"""Atomic file and directory writes: a reader never sees a half-written file, a failure leaves nothing behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import PackFormatError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a directory, everything in it) the permissions a plain ``open``/``mkdir`` would:
    0666/0777 less the umask (temporary files and directories are created private, 0600/0700)."""
    mask = _umask()
    path = Path(path)
    entries = [path] + (list(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for entry in entries:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path`` in one rename (ordinary
    permissions), on any exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


#: Files that mark a directory as editpack's own output, which ``overwrite`` may replace: an artifact's manifest,
#: the record of a merged model folder, the source record of a converted built-in model.
OWN_MARKERS = ("editpack.json", "editpack_applied.json", "editpack_source.json", "editpack_export.json")


def check_output(final: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Raise unless ``final`` may be written: absent, or (with ``overwrite``) a directory editpack wrote.

    ``overwrite`` never replaces a file, a symbolic link, or a directory that holds neither an artifact manifest
    nor a merged model's record: a folder of notes is not lost to a mistyped ``-o``. The parent must be a
    writable directory.
    """
    final = Path(final)
    if final.is_symlink():
        raise FileExistsError(f"{final} is a symbolic link; refusing to write through it")
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} already exists (pass overwrite=True / --overwrite to replace it)")
        if not final.is_dir():
            raise FileExistsError(f"{final} is a file, not a directory editpack wrote; refusing to replace it")
        if not any((final / marker).is_file() for marker in OWN_MARKERS):
            raise FileExistsError(f"{final} is not a pack or a model folder editpack wrote (no "
                                  f"{' or '.join(OWN_MARKERS)}); refusing to replace it with --overwrite")
    parent = final.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {final}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {final}: {parent} is not writable")
    try:  # what the write will do first (/proc, /sys, read-only mounts: access() says yes, mkdir says no)
        os.rmdir(tempfile.mkdtemp(prefix=".editpack-probe.", dir=parent))
    except OSError as exc:
        raise PermissionError(f"cannot write {final}: nothing can be created in {parent} ({exc.strerror})") from None
    return final


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; on success it replaces ``final`` in one rename.

    On any exception (``KeyboardInterrupt`` and, in the CLI, SIGTERM included) the temporary directory is removed
    and ``final`` is left exactly as it was. With ``overwrite`` an existing ``final`` that editpack wrote (see
    :func:`check_output`) is swapped out (moved aside, then deleted) only after the new content is complete. The
    result gets ordinary permissions.
    """
    final = check_output(final, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        ordinary_permissions(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path: str | os.PathLike) -> dict:
    """The tensors of a safetensors file (never a pickle), with a clear error for a damaged file."""

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PackFormatError(f"{path} is not a readable safetensors file (truncated or damaged?): {exc}") from None


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata)


@contextlib.contextmanager
def waiting_lock(path: Path, what: str, poll: float = 5.0):
    """A file lock beside ``path``; says so (once) when another process holds it, instead of waiting in silence."""
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=poll)
    except Timeout:
        logging.getLogger("editpack").info("Waiting for another editpack process that is computing %s (lock %s.lock)...", what, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
