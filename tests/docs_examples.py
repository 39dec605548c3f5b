"""The runnable examples of the README and the documentation, found and run as a reader would run them.

A fenced ``bash`` or ``python`` block directly after a ``<!-- runnable -->`` line is run; the blocks of one page run
in order in one fresh working folder (so a later block uses what an earlier one wrote), with ``tests/`` linked into
it for the shipped records and corpus slice. ``<!-- runnable -->`` blocks run on a tiny random model standing in for
the default built-in (they show commands, not knowledge: seconds each); ``<!-- runnable: real -->`` blocks run on the
real default model (the slow tests). Hub commands reach the test server the tests start on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
MARKER = re.compile(r"^<!-- runnable(?::\s*(?P<kind>real))? -->\s*\n```(?P<lang>bash|python)\n(?P<code>.*?)\n```",
                    re.M | re.S)


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    lang: str
    code: str
    real: bool

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def examples(real: bool) -> dict[Path, list[Example]]:
    """The runnable blocks of every page, by page, of one kind (``real`` or the tiny stand-in)."""
    found: dict[Path, list[Example]] = {}
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in MARKER.finditer(text):
            example = Example(page, text[: match.start()].count("\n") + 1, match["lang"], match["code"],
                              match["kind"] == "real")
            if example.real == real:
                found.setdefault(page, []).append(example)
    return found


def stand_in_home(home: Path) -> None:
    """An ``EDITPACK_HOME`` whose converted default built-in is a tiny random model (the real one is not read)."""
    from editpack.model.builtins import DEFAULT_MODEL
    from editpack.testing import tiny_model, tiny_tokenizer

    folder = home / "models" / DEFAULT_MODEL
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "editpack_source.json").write_text(json.dumps({"builtin": DEFAULT_MODEL, "stand_in": "tiny"}))


def run_page(page_examples: list[Example], workdir: Path, env: dict[str, str]) -> None:
    """Run a page's blocks in order in ``workdir``; raise with the block's output when one fails."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "tests").exists():
        (workdir / "tests").symlink_to(REPO / "tests")
    for example in page_examples:
        command = (["bash", "-euo", "pipefail", "-c", example.code] if example.lang == "bash"
                   else [sys.executable, "-c", example.code])
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise AssertionError(f"{example.name} failed ({done.returncode}):\n{example.code}\n--- output\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def environment(home: Path | None, hub=None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_DISABLE_XET="1", TOKENIZERS_PARALLELISM="false")
    if home is not None:
        env["EDITPACK_HOME"] = str(home)
    if hub is not None:
        env.update(HF_ENDPOINT=hub.url, HF_TOKEN=hub.token)
        env.pop("HF_HUB_OFFLINE", None)
    else:
        env["HF_HUB_OFFLINE"] = "1"
    return env
