"""The pack's card: a Hugging Face model card (``README.md``) built with huggingface_hub's ``ModelCard``.

Rendering is deterministic: the same manifest always gives the same bytes.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Protocol

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .chart import CHART


class Carded(Protocol):
    """What a card is rendered from: every artifact (:class:`editpack.packs.artifact.Artifact`) is one. The card
    module needs nothing else of it, so the artifact base can render its card without a circle of imports."""

    name: str
    version: str
    method: str
    hyperparameters: dict[str, Any]
    facts: list
    base: Any
    evaluation: dict[str, Any] | None
    files: dict[str, str]
    is_peft_adapter: bool
    card_tag: str
    card_template: str
    notes: list[str]

    def card_context(self) -> dict[str, Any]: ...

    def storage_summary(self) -> str: ...

MAX_FACTS_IN_CARD = 20


def _cell(value: Any) -> str:
    """A table cell: one line, at most 120 characters; a longer text keeps its start and its end, where a prompt
    asks its question (a chat-form prompt's system turn is its start)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text if len(text) <= 120 else text[:50] + " … " + text[-67:]
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


_ORIGINS = {"paraphrases": "from the paraphrases given with the facts",
            "relation_templates": "from CounterFact's other phrasings of the fact's relation",
            "not_measured": "not measured (no paraphrases, relation unknown)"}
_SIDE = {
    "locality_unchanged": "unrelated prompts, greedy answer unchanged (%)",
    "locality_kl": "unrelated prompts, mean next-token KL(base ‖ edited), nats",
    "same_subject_unchanged": "edited subject under other relations, answer unchanged (%)",
    "perplexity": "perplexity on held-out Wikipedia text",
    "fluency": "fluency of generic continuations (n-gram entropy, bits)",
}


def side_effects_markdown(evaluation: dict, chart: str | None) -> list[str]:
    side = evaluation.get("side_effects")
    if not side:
        return []
    lines = ["### Side effects", "", f"**{side['verdict']}.**", ""]
    if side.get("settings", {}).get("form") == "chat":
        lines += ["Asked in chat form, as the facts are: each suite prompt is the user's turn in the model's chat "
                  "template (perplexity is read on the plain text).", ""]
    if chart:
        lines += [f"![before and after]({chart})", ""]
    lines += ["| what | protocol | suite | n | before | after |", "|---|---|---|---|---|---|"]
    for name, claim in side["claims"].items():
        percent = claim["protocol"] == "generate_match"
        fmt = _fmt if percent else (lambda v: "–" if v is None else f"{v:.4g}")
        lines.append(f"| {_SIDE.get(name, name)} | `{claim['protocol']}` | `{claim['suite']}` | {claim['n']} | "
                     f"{fmt(claim['before'])} | {fmt(claim['after'])} |")
    lines += ["", "Suites ship with editpack (`editpack/suites`, provenance in its README); their sha256 are in "
              "`editpack.json`. `editpack verify <pack> --rerun` measures all of this again and compares.", ""]
    return lines


def evaluation_markdown(evaluation: dict, chart: str | None = None) -> str:
    """The card's evaluation section: side effects, then one table per protocol, before and after, with counts."""
    seconds = f" in {evaluation['seconds']:.1f} s" if evaluation.get("seconds") is not None else ""
    n = evaluation["n_facts"]
    lines = ["## Evaluation", "", f"Measured{seconds} on {evaluation.get('data', 'the pack facts')} "
             f"({n} fact{'s' if n != 1 else ''}); scores in %, means over probes, `n` = number of probes.", ""]
    lines += side_effects_markdown(evaluation, chart)
    origin = evaluation.get("generalization_origin")
    if origin:
        used = [f"{count} fact{'s' if count != 1 else ''} {_ORIGINS[key]}" for key, count in origin.items() if count]
        lines += ["Generalization: " + "; ".join(used) + ".", ""]
    lines += ["### The facts", ""]
    for protocol, metrics in evaluation["protocols"].items():
        lines += [f"#### `{protocol}`", "", "| metric | before | after | n |", "|---|---|---|---|"]
        for metric, row in metrics.items():
            lines.append(f"| {metric} | {_fmt(row['before'])} | {_fmt(row['after'])} | {row['n']} |")
        lines.append("")
    fluency = evaluation.get("fluency") or {}
    if fluency.get("n"):
        lines += [f"Fluency (weighted bi/trigram entropy of greedy generations, bits): before "
                  f"{fluency['before']:.3f}, after {fluency['after']:.3f} (n = {fluency['n']}).", ""]
    examples = evaluation.get("examples") or []
    if examples:
        lines += ["Greedy continuations, before → after:", ""]
        lines += [f"- *{_cell(e['prompt'])}* {_cell(e['before'].strip())!s} → **{_cell(e['after'].strip())}**"
                  for e in examples]
        lines.append("")
    lines.append("Known limits: the facts' own locality rows use only the neighbourhood prompts listed with the facts "
                 "(the side effects above cover unrelated prompts); teacher-forced scores flatter editors, "
                 "`generate_match` is the realistic one.")
    return "\n".join(lines)


def eval_results(pack: Carded) -> list[EvalResult] | None:
    """model-index entries (after-edit scores) for the Hub's metadata."""
    evaluation = pack.evaluation
    if not evaluation:
        return None
    results = []
    for protocol, metrics in evaluation["protocols"].items():
        for metric, row in metrics.items():
            if row["after"] is None:
                continue
            results.append(EvalResult(
                task_type="knowledge-editing", task_name="Knowledge editing",
                dataset_type="editpack-facts", dataset_name=evaluation.get("data", "pack facts"),
                metric_type=f"{protocol}/{metric}", metric_name=f"{metric} ({protocol})",
                metric_value=round(row["after"], 6),
            ))
    return results


def card_data(pack: Carded) -> ModelCardData:
    adapter = pack.is_peft_adapter and pack.base.hub_id
    return ModelCardData(
        base_model=pack.base.hub_id,
        # The Hub links an adapter to its base model by this (the model tree's "Adapters").
        base_model_relation="adapter" if adapter else None,
        library_name="peft" if pack.is_peft_adapter else None,
        tags=["editpack", "knowledge-editing", pack.method, pack.card_tag],
        model_name=pack.name,
        eval_results=eval_results(pack),
    )


#: Front-matter lines later editpack versions add to a card; a card written before one of them still matches.
ADDED_CARD_LINES = ("base_model_relation: adapter",)


def card_matches(text: str, pack: Carded) -> bool:
    """Whether ``text`` is the card of ``pack``'s manifest, as this editpack or an earlier one rendered it."""
    expected = render_card(pack)
    if text == expected:
        return True
    older = "\n".join(line for line in expected.split("\n") if line not in ADDED_CARD_LINES)
    return text == older


def render_card(pack: Carded, chart: str | None | bool = True) -> str:
    """The card's Markdown. ``chart``: the chart file's name (``None``: no chart); by default the pack's own
    ``evaluation.png`` when it lists one."""
    if chart is True:
        chart = CHART if CHART in pack.files else None
    template = resources.files("editpack.cards").joinpath(pack.card_template).read_text(encoding="utf-8")
    card = ModelCard.from_template(
        card_data(pack),
        template_str=template,
        name=pack.name,
        version=pack.version,
        method=pack.method,
        method_title=pack.method.upper(),
        base_id=pack.base.id,
        hub_id=pack.base.hub_id,
        model_type=pack.base.model_type,
        fingerprint=pack.base.fingerprint,
        storage=pack.storage_summary(),
        is_adapter=pack.is_peft_adapter,
        facts=[{k: _cell(getattr(f, k) if k != "prompt" else f.text) for k in ("prompt", "target_new")}
               | {"target_true": _cell(f.target_true or "")} for f in pack.facts[:MAX_FACTS_IN_CARD]],
        more_facts=max(0, len(pack.facts) - MAX_FACTS_IN_CARD),
        hyperparameters=[(k, _cell(v)) for k, v in sorted(pack.hyperparameters.items())],
        evaluation_section=evaluation_markdown(pack.evaluation, chart) if pack.evaluation else None,
        notes=list(getattr(pack, "notes", []) or []),
        **pack.card_context(),
    )
    return str(card).rstrip() + "\n"
