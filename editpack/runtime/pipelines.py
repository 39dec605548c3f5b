"""Edited models in ``transformers.pipeline``.

Three ways work, and the tests cover each:

1. :func:`pipeline` here: loads the model (or takes one), applies the packs, returns the pipeline.
2. Apply packs yourself and pass the ``PeftModel`` (or a merged model) to ``transformers.pipeline``.
3. ``AutoModelForCausalLM.from_pretrained(pack_dir)``: transformers' PEFT integration reads
   ``base_model_name_or_path`` from the pack's ``adapter_config.json``, loads that base model and the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .._lazy import transformers
from ..model.generation import generate
from ..model.loading import load_model
from .apply import apply, revert
from .combine import as_packs


def pipeline(model: Any = None, packs: Any = (), *, tokenizer: Any = None, task: str = "text-generation",
             merge: bool = False, check: bool = True, on_conflict: str = "error",
             load_kwargs: dict[str, Any] | None = None, **pipeline_kwargs: Any):
    """A transformers ``pipeline`` over ``model`` with ``packs`` applied.

    ``model`` is a loaded model, or anything :func:`editpack.load_model` takes (a built-in name, a folder, a
    Hub id; ``None`` means the base model the first pack records, else the default model). ``load_kwargs`` go to
    :func:`editpack.load_model` (``dtype``, ``load_in_4bit``, ``device_map``, ...); the rest go to
    ``transformers.pipeline`` (e.g. ``max_new_tokens`` belongs in the call, ``batch_size`` here).
    """

    loaded = as_packs(packs) if packs not in ((), [], None) else []
    if model is None or isinstance(model, str):
        model, loaded_tokenizer = load_model(model or (loaded[0].base.id if loaded else None), **(load_kwargs or {}))
        tokenizer = tokenizer or loaded_tokenizer
    tokenizer = tokenizer or getattr(model, "editpack_tokenizer", None)
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer=..., or a model loaded with editpack.load_model")
    if loaded:
        model = apply(model, loaded, merge=merge, check=check, on_conflict=on_conflict)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return transformers.pipeline(task, model=model, tokenizer=tokenizer, **pipeline_kwargs)


@dataclass(frozen=True)
class Comparison:
    """One prompt's greedy continuation by the base model and by the edited one."""

    prompt: str
    before: str
    after: str


def compare(model, packs: Any, prompts: Sequence[str], *, tokenizer: Any = None, max_new_tokens: int = 20,
            check: bool = True, on_conflict: str = "error") -> list[Comparison]:
    """Greedy continuations of ``prompts`` before and after applying ``packs`` (unmerged); the model is left
    without them afterwards (pass a model that carries no packs)."""
    tokenizer = tokenizer or getattr(model, "editpack_tokenizer", None)
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer=..., or a model loaded with editpack.load_model")
    prompts = list(prompts)
    before = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    edited = apply(model, packs, check=check, on_conflict=on_conflict, tokenizer=tokenizer)
    try:
        after = generate(edited, tokenizer, prompts, max_new_tokens=max_new_tokens)
    finally:
        revert(edited)
    return [Comparison(p, b, a) for p, b, a in zip(prompts, before, after)]
