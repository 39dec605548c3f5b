"""The playground's web layer: a FastAPI app over :class:`~editpack.ui.playground.Playground` and one page."""

from __future__ import annotations

from importlib import resources
from typing import Any
from urllib.parse import quote

from .._lazy import fastapi, fastapi_responses, markdown_it, trustedhost
from ..errors import EditpackError
from .playground import Playground


def render_card(markdown: str, key: str) -> str:
    """The card as HTML (no raw HTML passes through); the chart's relative link points at the pack's file."""

    body = markdown_it.MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return body.replace('src="evaluation.png"', f'src="/api/file?key={quote(key)}&amp;name=evaluation.png"')


def allowed_hosts(host: str) -> list[str] | None:
    """The Host header values a playground bound to ``host`` answers (a page on another name is refused, so a
    site that rebinds its DNS name to this address cannot drive the playground); ``None``: any (bound to every
    interface, where the names it is reached by are not known)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    if host in ("127.0.0.1", "localhost", "::1"):
        return ["127.0.0.1", "localhost", "::1", "[::1]"]
    return [host, f"[{host}]"] if ":" in host else [host]


def create_app(playground: Playground, *, hosts: list[str] | None = None):
    """A FastAPI application serving the page and its JSON API for ``playground``; ``hosts``: the Host header
    values it answers (:func:`allowed_hosts`; ``None``: any)."""

    app = fastapi.FastAPI(title="editpack playground", docs_url=None, redoc_url=None, openapi_url=None)
    if hosts is not None:
        app.add_middleware(trustedhost.TrustedHostMiddleware, allowed_hosts=hosts)
    page = resources.files("editpack.ui").joinpath("index.html").read_text(encoding="utf-8")

    def guarded(action):
        try:
            return action()
        except KeyError as exc:
            return fastapi_responses.JSONResponse({"error": str(exc.args[0] if exc.args else exc)}, status_code=404)
        except (EditpackError, ValueError, OSError) as exc:
            return fastapi_responses.JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/", response_class=fastapi_responses.HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/packs")
    def packs() -> Any:
        return {"packs": playground.listing(), "folder": str(playground.packs_dir),
                "folder_name": playground.packs_dir.name}

    @app.post("/api/refresh")
    def refresh() -> Any:
        return guarded(lambda: {"packs": playground.refresh()})

    @app.post("/api/switch")
    def switch(key: str = fastapi.Body(...), on: bool = fastapi.Body(...)) -> Any:
        return guarded(lambda: playground.switch(key, on))

    @app.get("/api/card")
    def card(key: str) -> Any:
        return guarded(lambda: {"key": key, "html": render_card(playground.card(key), key)})

    @app.get("/api/file")
    def file(key: str, name: str) -> Any:
        media = "image/png" if name.endswith(".png") else "text/plain; charset=utf-8"
        return guarded(lambda: fastapi_responses.Response(playground.read(key, name), media_type=media))

    @app.get("/api/versions")
    def versions(repo: str) -> Any:
        return guarded(lambda: {"repo": repo, "versions": playground.hub_versions(repo)})

    @app.post("/api/pull")
    def pull(reference: str = fastapi.Body(..., embed=True)) -> Any:
        return guarded(lambda: playground.pull(reference))

    @app.post("/api/compare")
    def compare(prompt: str = fastapi.Body(...), max_new_tokens: int = fastapi.Body(20)) -> Any:
        return guarded(lambda: playground.compare(prompt, max_new_tokens=max(1, min(max_new_tokens, 200))))

    @app.post("/api/edit")
    def edit(prompt: str = fastapi.Body(...), subject: str = fastapi.Body(...), target: str = fastapi.Body(...),
             method: str = fastapi.Body("rome")) -> Any:
        return guarded(lambda: playground.start_edit(prompt, subject, target, method).status())

    @app.get("/api/jobs/{job_id}")
    def job(job_id: int) -> Any:
        return guarded(lambda: playground.jobs[job_id].status())

    return app
