"""The playground's state and actions: packs found in a folder, the Hugging Face cache and Hub repositories,
which of them are switched on, base-versus-edited continuations, and edits run in the background.

The model is kept without packs between requests: a comparison applies the packs that are on, generates, and
reverts (:func:`editpack.runtime.pipelines.compare`), so switching a pack is only a change of this state and the model's
weights are never left changed. One lock serialises the model's use (comparisons wait while an edit runs).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..api import edit, method_config
from ..errors import EditpackError
from ..evaluation.report import evaluate_pack
from ..facts import make_fact
from ..model.generation import generate
from ..packs.artifact import Artifact, load_pack
from ..packs.manifest import MANIFEST, slug
from ..runtime.pipelines import compare
from ..share.hub import pull, scan_cache, versions

PHASES = ("computing the edit", "evaluating it", "saving the pack")


@dataclass
class Entry:
    """A pack the playground can show: where it was found and whether it is switched on."""

    key: str
    pack: Artifact
    origin: str  # "folder", "cache" or "hub"
    on: bool = False

    def summary(self) -> dict[str, Any]:
        side = (self.pack.evaluation or {}).get("side_effects") or {}
        return {
            "key": self.key, "name": self.pack.name, "version": self.pack.version, "kind": self.pack.kind,
            "method": self.pack.method, "facts": [f.text + " → " + f.target_new for f in self.pack.facts],
            "origin": self.origin, "on": self.on, "base": self.pack.base.id, "verdict": side.get("verdict"),
        }


@dataclass
class Job:
    """An edit running in the background: its phase (index into :data:`PHASES`), outcome and timing."""

    id: int
    phase: int = 0
    done: bool = False
    error: str | None = None
    pack: str | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def status(self) -> dict[str, Any]:
        end = self.finished or time.monotonic()
        return {"id": self.id, "phase": self.phase, "phases": list(PHASES), "done": self.done, "error": self.error,
                "pack": self.pack, "seconds": round(end - self.started, 1)}


class Playground:
    """Packs and a model for the playground page (see the module docstring).

    ``packs_dir`` is where the folder's packs are read from and where new edits are saved (created if needed);
    ``corpus`` is the key-statistics corpus for the methods that take one (``stats_corpus``).
    """

    def __init__(self, model, tokenizer, packs_dir: str | Path, *, evaluate: bool = True,
                 corpus: str | None = None) -> None:
        self.model = model
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.packs_dir = Path(packs_dir)
        self.packs_dir.mkdir(parents=True, exist_ok=True)
        self.evaluate = evaluate
        self.entries: dict[str, Entry] = {}
        self.jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._model_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self.refresh()

    # ------------------------------------------------------------------------------------------ packs
    def refresh(self) -> list[dict[str, Any]]:
        """Read the folder and the Hugging Face cache again; switched-on packs stay on."""
        found: dict[str, tuple[Artifact, str]] = {}
        for folder in sorted(p for p in self.packs_dir.iterdir() if (p / MANIFEST).is_file()):
            try:
                found[f"folder:{folder.name}"] = (load_pack(folder), "folder")
            except EditpackError:
                continue  # a damaged pack is not offered (editpack verify says why)
        for key, pack in _cached_packs():
            found.setdefault(key, (pack, "cache"))
        with self._state_lock:
            on = {k for k, e in self.entries.items() if e.on}
            hub = {k: e for k, e in self.entries.items() if e.origin == "hub" and k not in found}
            self.entries = {k: Entry(k, pack, origin, k in on) for k, (pack, origin) in found.items()}
            self.entries.update(hub)
            return self.listing()

    def listing(self) -> list[dict[str, Any]]:
        return [e.summary() for e in sorted(self.entries.values(), key=lambda e: (e.origin, e.pack.name, e.key))]

    def entry(self, key: str) -> Entry:
        try:
            return self.entries[key]
        except KeyError:
            raise KeyError(f"no pack {key!r} here") from None

    def switch(self, key: str, on: bool) -> dict[str, Any]:
        entry = self.entry(key)
        if on and entry.pack.base.model_type != getattr(self.model.config, "model_type", None):
            raise EditpackError(f"{entry.pack.ref} was made for a {entry.pack.base.model_type} model, not this "
                                f"{self.model.config.model_type} one")
        entry.on = on
        return entry.summary()

    def card(self, key: str) -> str:
        """The pack's card (README.md) as Markdown, without its YAML front matter."""
        pack = self.entry(key).pack
        text = self.read(key, "README.md").decode("utf-8") if "README.md" in (pack.files or {}) else ""
        if text.startswith("---"):
            end = text.find("\n---", 3)
            text = text[end + 4 :] if end >= 0 else text
        return text.strip()

    def read(self, key: str, name: str) -> bytes:
        """The bytes of a file the pack's manifest lists (the card, its chart), never anything else: checked at
        every read, so a file swapped after the pack was loaded (for a link to /etc/passwd, or other content) is
        refused rather than served."""
        pack = self.entry(key).pack
        if name not in (pack.files or {}) or pack.path is None:
            raise KeyError(f"{pack.ref} lists no file {name!r}")
        path = Path(pack.path) / name
        if path.is_symlink() and pack.source is None:  # links only in the Hugging Face cache, into its blobs
            raise EditpackError(f"{pack.ref}: {name} is now a symbolic link; refusing to read it")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != pack.files[name]:
            raise EditpackError(f"{pack.ref}: {name} changed since the pack was loaded (its sha256 is not the "
                                "manifest's); refusing to serve it")
        return data

    def hub_versions(self, repo_id: str) -> list[dict[str, Any]]:
        return [{"version": v.version, "date": v.date, "reference": f"{repo_id}@{v.version}"}
                for v in versions(repo_id)]

    def pull(self, reference: str) -> dict[str, Any]:
        """Download (into the Hugging Face cache) and verify a Hub pack, and offer it."""
        pack = pull(reference)
        key = f"hub:{reference}"
        with self._state_lock:
            self.entries[key] = Entry(key, pack, "hub")
        return self.entries[key].summary()

    # ------------------------------------------------------------------------------------------ model
    def compare(self, prompt: str, max_new_tokens: int = 20) -> dict[str, Any]:
        """Greedy continuations of ``prompt`` by the base model and with the switched-on packs."""
        if not prompt.strip():
            raise ValueError("type a prompt first")
        on = [e.pack for e in self.entries.values() if e.on]
        with self._model_lock:
            if not on:
                base = generate(self.model, self.tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]
                return {"prompt": prompt, "base": base, "edited": base, "packs": []}
            result = compare(self.model, on, [prompt], tokenizer=self.tokenizer, max_new_tokens=max_new_tokens)[0]
        return {"prompt": prompt, "base": result.before, "edited": result.after, "packs": [p.ref for p in on]}

    def start_edit(self, prompt: str, subject: str, target: str, method: str = "rome", **hyperparameters) -> Job:
        """Edit in the background: compute, evaluate (unless the playground was made with ``evaluate=False``),
        save into the folder, and switch the new pack on. Returns the job to poll."""

        fact = make_fact(prompt, subject, target)  # bad input fails here, before any thread starts
        method_cls, _ = method_config(method, **hyperparameters)  # and so does an unknown method or setting
        if self.corpus and "stats_corpus" in method_cls.config_class.__dataclass_fields__:
            hyperparameters.setdefault("stats_corpus", self.corpus)
        job = Job(next(self._ids))
        self.jobs[job.id] = job
        threading.Thread(target=self._edit, args=(job, fact, method, hyperparameters), daemon=True).start()
        return job

    def _edit(self, job: Job, fact, method: str, hyperparameters: dict) -> None:
        try:
            with self._model_lock:
                pack = edit(self.model, fact, method, tokenizer=self.tokenizer, **hyperparameters)
                if self.evaluate:
                    job.phase = 1
                    pack.evaluation = evaluate_pack(self.model, self.tokenizer, pack)
            job.phase = 2
            target = self._free_name(pack.name)
            pack.save(target)
            key = f"folder:{target.name}"
            with self._state_lock:
                self.entries[key] = Entry(key, load_pack(target), "folder", on=True)
            job.pack = key
        except Exception as exc:  # noqa: BLE001  (the page shows the message; the traceback goes to the log)
            job.error = str(exc) or exc.__class__.__name__
            traceback.print_exc()
        finally:
            job.done, job.finished = True, time.monotonic()

    def _free_name(self, name: str) -> Path:
        stem = slug(name) or "pack"
        for n in itertools.count(1):
            candidate = self.packs_dir / (stem if n == 1 else f"{stem}-{n}")
            if not candidate.exists():
                return candidate
        raise AssertionError("unreachable")


def _cached_packs() -> list[tuple[str, Artifact]]:
    """Packs in the Hugging Face cache: every snapshot of a model repository that holds an editpack manifest."""
    info = scan_cache()
    if info is None:
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            folder = Path(revision.snapshot_path)
            if not (folder / MANIFEST).is_file():
                continue
            try:
                pack = load_pack(folder, links_into=Path(repo.repo_path))
            except EditpackError:
                continue
            refs = sorted(revision.refs) or [revision.commit_hash[:12]]
            pack.source = f"{repo.repo_id}@{revision.commit_hash}"
            out.append((f"cache:{repo.repo_id}@{refs[0]}", pack))
    return out
