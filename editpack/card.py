"""The pack's card: a Hugging Face model card (``README.md``) built with huggingface_hub's ``ModelCard``.

Rendering is deterministic: the same manifest always gives the same bytes.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:  # pragma: no cover
    from .pack import EditPack

MAX_FACTS_IN_CARD = 20


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text if len(text) <= 120 else text[:117] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def card_data(pack: "EditPack", eval_results: list | None = None) -> ModelCardData:
    return ModelCardData(
        base_model=pack.base.hub_id,
        library_name="peft",
        tags=["editpack", "knowledge-editing", pack.method, "lora"],
        model_name=pack.name,
        eval_results=eval_results,
    )


def render_card(pack: "EditPack", evaluation_section: str | None = None, eval_results: list | None = None) -> str:
    template = resources.files("editpack.cards").joinpath("pack_card.md").read_text(encoding="utf-8")
    delta = pack.delta.modules
    ranks = sorted({d.rank for d in delta.values()})
    delta_summary = (f"{len(delta)} module{'s' if len(delta) != 1 else ''}: "
                     + ", ".join(f"`{m}`" for m in sorted(delta)) + f"; rank {'/'.join(map(str, ranks))}")
    card = ModelCard.from_template(
        card_data(pack, eval_results),
        template_str=template,
        name=pack.name,
        version=pack.version,
        method=pack.method,
        method_title=pack.method.upper(),
        base_id=pack.base.id,
        hub_id=pack.base.hub_id,
        model_type=pack.base.model_type,
        fingerprint=pack.base.fingerprint,
        delta_summary=delta_summary,
        facts=[{k: _cell(getattr(f, k) if k != "prompt" else f.text) for k in ("prompt", "target_new")}
               | {"target_true": _cell(f.target_true or "")} for f in pack.facts[:MAX_FACTS_IN_CARD]],
        more_facts=max(0, len(pack.facts) - MAX_FACTS_IN_CARD),
        hyperparameters=[(k, _cell(v)) for k, v in sorted(pack.hyperparameters.items())],
        evaluation_section=evaluation_section,
    )
    return str(card).rstrip() + "\n"
