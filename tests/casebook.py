"""The rows of a bad-input round: each case's class and the message it gets now, printed as a table at the end of
the test run (``tests/conftest.py``) and, with ``EDITPACK_CASE_TABLE=FILE``, written there as Markdown."""

from __future__ import annotations

import os
import re
from pathlib import Path

#: (class, case, outcome, message), added by the tests as they run.
ROWS: list[tuple[str, str, str, str]] = []


def record(kind: str, case: str, outcome: str, message: str) -> None:
    first = re.sub(r"/\S*?/pytest-\d+/[^/\s]+", "<tmp>", " ".join(message.strip().split()))
    ROWS.append((kind, case, outcome, first[:200] + ("…" if len(first) > 200 else "")))


def table() -> str:
    lines = ["| class | case | outcome now | message |", "|---|---|---|---|"]
    for kind, case, outcome, message in sorted(ROWS):
        lines.append(f"| {kind} | {case} | {outcome} | {message.replace('|', '/')} |")
    return "\n".join(lines)


def write_table() -> None:
    target = os.environ.get("EDITPACK_CASE_TABLE")
    if target and ROWS:
        Path(target).write_text(table() + "\n", encoding="utf-8")
