"""``editpack.edit``: compute an edit on a model and return it as a pack (the model is left unchanged)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from .arch import spec_for
from .errors import EditpackError, InvalidFactError
from .facts import Fact, facts_from_records, load_facts
from .fingerprint import combine, materialized, module_fingerprints, unwrap, weight_fingerprint
from .methods import get_method
from .models import BUILTINS, ModelRef
from .pack import BaseModel, EditPack, check_version, slug


def as_facts(facts: Any) -> list[Fact]:
    """Accept a Fact, a dict, a list of either, or a ``[format:]path`` to a facts file."""
    if isinstance(facts, (str, Path)):
        return load_facts(facts)
    items = facts if isinstance(facts, (list, tuple)) else [facts]
    out: list[Fact] = []
    for item in items:
        if isinstance(item, Fact):
            out.append(item)
        else:
            out.extend(facts_from_records([item], source="facts", skip_invalid=False))
    if not out:
        raise InvalidFactError("no facts given")
    return out


def base_model_info(model: torch.nn.Module, modules: Iterable[str]) -> BaseModel:
    """What a pack records about the model it was computed on (original weights, before any pack)."""
    model = unwrap(model)
    ref: ModelRef | None = getattr(model, "editpack_ref", None)
    model_id = ref.id if ref else (getattr(model, "name_or_path", "") or "unknown")
    builtin = BUILTINS.get(model_id)
    hub_id = builtin.hub_id if builtin else (model_id if ref and ref.path == model_id else None)
    fingerprints = module_fingerprints(model, modules)
    with materialized(model.get_submodule(spec_for(model).embed)) as embed:
        embedding = weight_fingerprint(embed.weight)
    return BaseModel(
        id=model_id,
        fingerprint=combine(fingerprints),
        modules=fingerprints,
        embedding=embedding,
        model_type=model.config.model_type,
        revision=ref.revision if ref else None,
        hub_id=hub_id,
        path=ref.path if ref else getattr(model, "name_or_path", None),
    )


def edit(
    model: torch.nn.Module,
    facts: Any,
    method: str = "rome",
    *,
    tokenizer=None,
    name: str | None = None,
    version: str = "1.0.0",
    **hyperparameters: Any,
) -> EditPack:
    """Compute ``method``'s edit of ``model`` for ``facts`` and return it as an :class:`EditPack`.

    ``model`` is not changed (apply the pack with :func:`editpack.apply`). ``tokenizer`` defaults to the one
    :func:`editpack.load_model` loaded with the model. Remaining keyword arguments are the method's
    hyper-parameters (e.g. ``layers=[5]``, ``stats_corpus=path``); unknown ones are an error.

    ``model`` may carry packs (applied with :func:`editpack.apply`, merged or not): the edit is then computed on
    the edited model, holds only the change on top of them, and records them as parents that must be applied
    first (:attr:`EditPack.requires`).
    """
    from .apply import applied

    on_model = applied(model)
    if any(not r.enabled for r in on_model):
        off = [r.pack.ref for r in on_model if not r.enabled]
        raise EditpackError(f"packs {off} are switched off on this model; remove them or switch them on first")
    parents = [r.pack.lineage_record("onto") for r in on_model]
    model = unwrap(model)
    tokenizer = tokenizer or getattr(model, "editpack_tokenizer", None)
    if tokenizer is None:
        raise EditpackError("no tokenizer: pass tokenizer=..., or load the model with editpack.load_model")
    check_version(version)
    fact_list = as_facts(facts)
    spec = spec_for(model)
    method_cls = get_method(method)
    config = method_cls.config_class.from_dict(hyperparameters)
    delta = method_cls(config).compute(model, tokenizer, fact_list, spec)
    return EditPack(
        name=name or f"{method}-{slug(fact_list[0].subject)}" + (f"-and-{len(fact_list) - 1}-more" if len(fact_list) > 1 else ""),
        version=version,
        method=method,
        hyperparameters=config.to_dict(),
        facts=fact_list,
        base=base_model_info(model, delta.modules),
        delta=delta,
        fan_in_fan_out=spec.mlp_transposed,
        parents=parents,
    )
