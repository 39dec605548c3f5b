"""Default evaluation suites shipped with editpack (package data; provenance in this folder's README)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

FILES = {
    "locality": "locality.jsonl",
    "relation_templates": "relation_templates.json",
    "heldout": "heldout.jsonl",
    "generic_prompts": "generic_prompts.json",
}


@dataclass(frozen=True)
class Suite:
    """One shipped suite: its items and the sha256 of the file they came from."""

    name: str
    file: str
    sha256: str
    items: Any

    def describe(self) -> dict[str, str]:
        return {"file": self.file, "sha256": self.sha256}


@lru_cache(maxsize=None)
def load(name: str) -> Suite:
    if name not in FILES:
        raise KeyError(f"no suite {name!r} (known: {', '.join(FILES)})")
    data = resources.files(__name__).joinpath(FILES[name]).read_bytes()
    text = data.decode("utf-8")
    items = ([json.loads(line) for line in text.splitlines() if line.strip()] if FILES[name].endswith(".jsonl")
             else json.loads(text))
    return Suite(name, FILES[name], hashlib.sha256(data).hexdigest(), items)
