"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for tests and benchmarks of code that pushes and
pulls packs (no real Hub is needed; nothing leaves the machine).

It implements the endpoints the real ``huggingface_hub`` client uses for model repositories, with the headers
the client checks, so tests run the real client (``HfApi``, ``snapshot_download``, PEFT's loading) against it:

- ``POST /api/repos/create``; ``GET /api/models/{repo}[/revision/{rev}]`` (repo info, ``sha``, ``siblings``)
- ``POST /api/validate-yaml``; ``POST /api/models/{repo}/preupload/{rev}`` (``*.safetensors`` go to LFS)
- ``POST /{repo}.git/info/lfs/objects/batch`` and ``PUT /_lfs/{oid}`` (basic LFS transfer, sha256 checked)
- ``POST /api/models/{repo}/commit/{rev}`` (ndjson: header, file, lfsFile, deletedFile)
- ``GET /api/models/{repo}/refs``; ``POST /api/models/{repo}/tag/{rev}``; ``GET /api/models/{repo}/commits/{rev}``
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``/``Size``

Private repositories answer 401 without the server's token. ``fail_next(kind)`` makes the next request of a
kind (``commit``, ``tag``, ``lfs``, ``resolve``) fail with 500; ``tamper(repo, path)`` changes the bytes a file
serves without changing its commit (a corrupted download); ``symlink(repo, path)`` lists a file as a link.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, str]  # path -> sha256 of the content (key into the blob store)
    title: str
    message: str
    date: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs_paths: set[str] = field(default_factory=set)


class HubState:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.failures: dict[str, int] = {}
        self.tampered: dict[tuple[str, str], bytes] = {}
        self.symlinks: set[tuple[str, str]] = set()
        self.lock = threading.RLock()
        self.counter = 0

    def new_oid(self, seed: str) -> str:
        self.counter += 1
        return hashlib.sha1(f"{seed}:{self.counter}".encode()).hexdigest()

    def store(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        self.blobs[key] = data
        return key

    def resolve(self, repo: Repo, revision: str) -> Commit | None:
        revision = unquote(revision)
        oid = repo.branches.get(revision) or repo.tags.get(revision) or (revision if revision in repo.commits else None)
        return repo.commits.get(oid) if oid else None

    def now(self) -> str:
        return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class HubServer:
    """Start with ``with HubServer() as hub:``; ``hub.url`` is the endpoint, ``hub.token`` a valid token."""

    def __init__(self, token: str = "hf_test_token_0123456789") -> None:
        self.state = HubState(token)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        handler.base_url = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def token(self) -> str:
        return self.state.token

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail_next(self, kind: str, times: int = 1) -> None:
        self.state.failures[kind] = self.state.failures.get(kind, 0) + times

    def tamper(self, repo_id: str, path: str, data: bytes) -> None:
        self.state.tampered[(repo_id, path)] = data

    def symlink(self, repo_id: str, path: str) -> None:
        """List ``path`` in the repository's tree as a symbolic link (git mode 120000), as a repo pushed with a link
        shows it; its bytes are still served (git stores a link as a blob holding the target)."""
        self.state.symlinks.add((repo_id, path))

    def tags(self, repo_id: str) -> dict[str, str]:
        return dict(self.state.repos[repo_id].tags)

    def commits(self, repo_id: str) -> list[str]:
        return list(self.state.repos[repo_id].commits)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState
    base_url: str

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # ------------------------------------------------------------------------------------------ helpers
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.state.token}"

    def _fail(self, kind: str) -> bool:
        if self.state.failures.get(kind, 0) > 0:
            self.state.failures[kind] -= 1
            self._error(500, f"injected {kind} failure")
            return True
        return False

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if repo.private and not self._authorized():  # like the Hub: a private repo is "not found" to strangers
            self._error(401, "Repository not found", "RepoNotFound")
            return None
        if write and not self._authorized():
            self._error(401, "Invalid username or password.")
            return None
        return repo

    # ------------------------------------------------------------------------------------------ routing
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        with self.state.lock:
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                return self._repo_info(m[1], m[2] or "main")
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/refs", path):
                return self._refs(m[1])
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commits/([^/]+)", path):
                return self._commits(m[1], m[2])
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                return self._tree(m[1], m[2], m[3] or "")
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(m[1], m[2], m[3])
        self._error(404, f"no route for GET {path}")

    def do_POST(self) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        body = self._body()
        with self.state.lock:
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            if path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
                return self._preupload(m[1], json.loads(body))
            if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                return self._lfs_batch(m[1], json.loads(body))
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
                return self._commit(m[1], m[2], body)
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tag/([^/]+)", path):
                return self._tag(m[1], m[2], json.loads(body))
        self._error(404, f"no route for POST {path}")

    def do_PUT(self) -> None:
        path = unquote(urlparse(self.path).path)
        body = self._body()
        with self.state.lock:
            if m := re.fullmatch(r"/_lfs/([0-9a-f]{64})", path):
                if self._fail("lfs"):
                    return
                if hashlib.sha256(body).hexdigest() != m[1]:
                    return self._error(400, "sha256 mismatch")
                self.state.store(body)
                return self._send(200)
        self._error(404, f"no route for PUT {path}")

    # ------------------------------------------------------------------------------------------ endpoints
    def _create(self, payload: dict) -> None:
        if not self._authorized():
            return self._error(401, "Invalid username or password.")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        if repo_id in self.state.repos:  # the real Hub's conflict answer carries the url too
            return self._json(409, {"error": "You already created this model repo", "url": f"{self.base_url}/{repo_id}"},
                              {"X-Error-Message": "You already created this model repo"})
        private = payload.get("private") or payload.get("visibility") == "private"
        repo = Repo(repo_id, bool(private))
        attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        oid = self.state.new_oid(repo_id)
        repo.commits[oid] = Commit(oid, {".gitattributes": self.state.store(attributes)}, "initial commit", "",
                                   self.state.now(), None)
        repo.branches["main"] = oid
        self.state.repos[repo_id] = repo
        self._json(200, {"url": f"{self.base_url}/{repo_id}", "name": repo_id})

    def _at(self, repo_id: str, revision: str, write: bool = False) -> tuple[Repo, Commit] | None:
        """The repo and the commit ``revision`` names, or ``None`` after answering with the error."""
        repo = self._repo(repo_id, write=write)
        if repo is None:
            return None
        commit = self.state.resolve(repo, revision)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return None
        return repo, commit

    def _repo_info(self, repo_id: str, revision: str) -> None:
        found = self._at(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
                         "disabled": False, "gated": False, "lastModified": commit.date, "tags": [],
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def _refs(self, repo_id: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        self._json(200, {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.branches.items()],
            "converts": [],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in repo.tags.items()],
        })

    def _commits(self, repo_id: str, revision: str) -> None:
        found = self._at(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        out = []
        while commit is not None:
            out.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                        "authors": [{"user": "user"}], "date": commit.date})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(200, out)

    def _tree(self, repo_id: str, revision: str, prefix: str) -> None:
        found = self._at(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        entries = []
        for path, key in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            data = self.state.blobs[key]
            kind = "symlink" if (repo_id, path) in self.state.symlinks else "file"
            entry = {"type": kind, "path": path, "size": len(data), "oid": git_blob_id(data)}
            if path in repo.lfs_paths:
                entry["lfs"] = {"oid": key, "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        if self._fail("resolve"):
            return
        found = self._at(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        if path not in commit.files:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound")
        key = commit.files[path]
        data = self.state.tampered.get((repo_id, path), self.state.blobs[key])
        headers = {"X-Repo-Commit": commit.oid}
        if path in repo.lfs_paths:
            headers.update({"ETag": f'"{key}"', "X-Linked-Etag": f'"{key}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{git_blob_id(self.state.blobs[key])}"'
        self._send(200, data, headers, content_type="application/octet-stream")

    def _preupload(self, repo_id: str, payload: dict) -> None:
        if self._repo(repo_id, write=True) is None:
            return
        files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                  "shouldIgnore": False} for f in payload["files"]]
        self._json(200, {"files": files})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        if self._repo(repo_id, write=True) is None:
            return
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.blobs:
                entry["actions"] = {"upload": {"href": f"{self.base_url}/_lfs/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if self._fail("commit"):
            return
        branch = unquote(revision)
        if branch not in repo.branches:
            return self._error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        parent = repo.commits[repo.branches[branch]]
        files = dict(parent.files)
        header: dict = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = self.state.store(base64.b64decode(value["content"]))
                repo.lfs_paths.discard(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in self.state.blobs:
                    return self._error(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = value["oid"]
                repo.lfs_paths.add(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                files = {p: k for p, k in files.items() if p != value["path"] and not p.startswith(value["path"] + "/")}
        oid = self.state.new_oid(repo_id)
        repo.commits[oid] = Commit(oid, files, header.get("summary", ""), header.get("description", ""),
                                   self.state.now(), parent.oid)
        repo.branches[branch] = oid
        self._json(200, {"commitUrl": f"{self.base_url}/{repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})

    def _tag(self, repo_id: str, revision: str, payload: dict) -> None:
        if self._fail("tag"):
            return
        found = self._at(repo_id, revision, write=True)
        if found is None:
            return
        repo, commit = found
        if payload["tag"] in repo.tags:
            return self._error(409, f"Tag {payload['tag']} already exists")
        repo.tags[payload["tag"]] = commit.oid
        self._json(200, {})

