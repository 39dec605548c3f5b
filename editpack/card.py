"""The pack's card: a Hugging Face model card (``README.md``) built with huggingface_hub's ``ModelCard``.

Rendering is deterministic: the same manifest always gives the same bytes.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

if TYPE_CHECKING:  # pragma: no cover
    from .pack import EditPack

MAX_FACTS_IN_CARD = 20


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text if len(text) <= 120 else text[:117] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def evaluation_markdown(evaluation: dict) -> str:
    """The card's evaluation section: one table per protocol, before and after, with counts."""
    lines = ["## Evaluation", "", f"Measured on {evaluation.get('data', 'the pack facts')} "
             f"({evaluation['n_facts']} facts); scores in %, means over probes, `n` = number of probes.", ""]
    for protocol, metrics in evaluation["protocols"].items():
        lines += [f"### `{protocol}`", "", "| metric | before | after | n |", "|---|---|---|---|"]
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
    lines.append("Known limits: locality is measured only on the neighbourhood prompts listed with the facts; "
                 "teacher-forced scores flatter editors, `generate_match` is the realistic one.")
    return "\n".join(lines)


def eval_results(pack: "EditPack") -> list[EvalResult] | None:
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


def card_data(pack: "EditPack") -> ModelCardData:
    return ModelCardData(
        base_model=pack.base.hub_id,
        library_name="peft" if pack.is_peft_adapter else None,
        tags=["editpack", "knowledge-editing", pack.method, pack.card_tag],
        model_name=pack.name,
        eval_results=eval_results(pack),
    )


def render_card(pack: "EditPack") -> str:
    template = resources.files("editpack.cards").joinpath("pack_card.md").read_text(encoding="utf-8")
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
        evaluation_section=evaluation_markdown(pack.evaluation) if pack.evaluation else None,
    )
    return str(card).rstrip() + "\n"
