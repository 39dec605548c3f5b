"""The card's before/after chart: a small PNG in the pack (``evaluation.png``), which the Hub renders inline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._lazy import matplotlib, matplotlib_figure

CHART = "evaluation.png"


def write_chart(rows: dict[str, tuple[float | None, float | None]], path: Path, title: str) -> bool:
    """Grouped bars (before, after; in %) for ``rows``; returns False (and writes nothing) when there is nothing
    to draw. The PNG carries no timestamp or software tag, so the same numbers give the same bytes."""
    rows = {k: v for k, v in rows.items() if v[0] is not None or v[1] is not None}
    if not rows:
        return False

    matplotlib.use("Agg", force=False)

    labels = list(rows)
    before = [100 * (v[0] or 0.0) for v in rows.values()]
    after = [100 * (v[1] or 0.0) for v in rows.values()]
    fig = matplotlib_figure.Figure(figsize=(1.3 * len(labels) + 1.5, 3.0), dpi=100)
    ax = fig.add_subplot()
    xs = range(len(labels))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], before, width, label="before", color="#9aa5b1")
    bars = ax.bar([x + width / 2 for x in xs], after, width, label="after", color="#2f6fde")
    for bar, value in zip(bars, after):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 1, f"{value:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylim(0, 112)
    ax.set_ylabel("%", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return True


def summary_rows(evaluation: dict) -> dict[str, Any]:
    """The handful of numbers the chart and verdict show (after vs before), for the card."""
    rows: dict[str, Any] = {}
    for protocol in ("prob_compare", "generate_match"):
        metrics = (evaluation.get("protocols") or {}).get(protocol) or {}
        for metric in ("reliability", "generalization"):
            row = metrics.get(metric)
            if row and row.get("n"):
                rows[f"{metric}\n({protocol})"] = (row["before"], row["after"])
    claims = (evaluation.get("side_effects") or {}).get("claims") or {}
    labels = {"locality_unchanged": "unrelated answers\nunchanged", "same_subject_unchanged": "same subject,\nother relations"}
    for name, label in labels.items():
        claim = claims.get(name)
        if claim and claim.get("n"):
            rows[label] = (claim["before"], claim["after"])
    return rows
