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
    state: dict[str, torch.Tensor] | None = None,
    **hyperparameters: Any,
) -> EditPack:
    """Compute ``method``'s edit of ``model`` for ``facts`` and return it as an :class:`EditPack`.

    ``model`` is not changed (apply the pack with :func:`editpack.apply`). ``tokenizer`` defaults to the one
    :func:`editpack.load_model` loaded with the model. Remaining keyword arguments are the method's
    hyper-parameters (e.g. ``layers=[5]``, ``stats_corpus=path``); unknown ones are an error.

    ``model`` may carry packs (applied with :func:`editpack.apply`, merged or not): the edit is then computed on
    the edited model, holds only the change on top of them, and records them as parents that must be applied
    first (:attr:`EditPack.requires`). ``state`` is the method state of the pack being extended (see
    :func:`extend`, which is the usual way to edit sequentially).
    """
    from .apply import applied

    on_model = applied(model)
    if any(not r.enabled for r in on_model):
        off = [r.pack.ref for r in on_model if not r.enabled]
        raise EditpackError(f"packs {off} are switched off on this model; remove them or switch them on first")
    # Memory packs route generation only; the weights an edit is computed on do not depend on them.
    parents = [r.pack.lineage_record("onto") for r in on_model if not r.memory]
    model = unwrap(model)
    tokenizer = tokenizer or getattr(model, "editpack_tokenizer", None)
    if tokenizer is None:
        raise EditpackError("no tokenizer: pass tokenizer=..., or load the model with editpack.load_model")
    check_version(version)
    fact_list = as_facts(facts)
    spec = spec_for(model)
    method_cls = get_method(method)
    config = method_cls.config_class.from_dict({**spec.method_defaults(method), **hyperparameters})
    instance = method_cls(config)
    name = name or f"{method}-{slug(fact_list[0].subject)}" + (f"-and-{len(fact_list) - 1}-more" if len(fact_list) > 1 else "")
    build_pack = getattr(instance, "build_pack", None)
    if build_pack is not None:  # methods that make another kind of pack (memory packs)
        info = base_model_info(model, [])
        base = BaseModel(id=info.id, fingerprint="", model_type=info.model_type, hub_id=info.hub_id)
        return build_pack(model, tokenizer, fact_list, name=name, version=version, base=base, parents=parents,
                          state=state)
    delta = instance.compute(model, tokenizer, fact_list, spec, state=state)
    return EditPack(
        name=name,
        version=version,
        method=method,
        hyperparameters=config.to_dict(),
        facts=fact_list,
        base=base_model_info(model, delta.modules),
        delta=delta,
        fan_in_fan_out=spec.mlp_transposed,
        parents=parents,
    )


def next_version(version: str) -> str:
    """The next minor version: ``1.2.3`` -> ``1.3.0`` (a pre-release suffix is dropped)."""
    major, minor, _ = check_version(version).split("-")[0].split(".")
    return f"{major}.{int(minor) + 1}.0"


def extend(
    model: torch.nn.Module,
    pack: Any,
    facts: Any,
    method: str | None = None,
    *,
    tokenizer=None,
    version: str | None = None,
    **hyperparameters: Any,
) -> EditPack:
    """The next version of ``pack``: ``facts`` edited on ``model`` with ``pack`` applied, combined with it.

    Sequential editing: the new facts are computed on the model as ``pack`` leaves it (with the method state
    ``pack`` carries, e.g. AlphaEdit's earlier keys), and the result holds both deltas, all facts (a new fact
    replaces an earlier one about the same subject and relation), the method's new state, and ``pack`` as its
    ``extends`` parent. It applies to the base model on its own. ``method`` and hyper-parameters default to
    ``pack``'s; ``version`` to the next minor version. ``model`` must carry no packs (it is left unchanged).
    """
    from .apply import applied, apply, fact_key, revert
    from .fingerprint import combine
    from .hub import resolve_pack
    from .methods.delta import WeightDelta

    parent = resolve_pack(pack)
    if applied(model):
        raise EditpackError("extend() applies the pack itself: pass the model without packs")
    if getattr(parent, "kind", "weight") == "memory":  # a memory pack grows by its facts alone
        from .memory import SentenceEncoder

        if method not in (None, parent.method) or hyperparameters:
            raise EditpackError(f"{parent.ref} is a memory pack: it is extended with more facts only")
        return parent.with_facts(SentenceEncoder(), add=as_facts(facts), version=version or next_version(parent.version))
    method = method or parent.method
    base_hparams = dict(parent.hyperparameters) if method == parent.method and "stacked" not in parent.hyperparameters else {}
    base_hparams.update(hyperparameters)
    version = version or next_version(parent.version)
    state = parent.delta.state if method == parent.method else None
    edited = apply(model, parent)
    try:
        child = edit(edited, facts, method, tokenizer=tokenizer, name=parent.name, version=version, state=state,
                     **base_hparams)
    finally:
        revert(edited)
    delta = WeightDelta(state=dict(child.delta.state))
    for source in (parent, child):
        for module, part in sorted(source.delta.modules.items()):
            delta.add(module, part)
    replaced = {fact_key(f) for f in child.facts}
    modules = {**(parent.base.modules or {}), **(child.base.modules or {})}
    base = BaseModel(**{**parent.base.to_dict(), "modules": modules, "fingerprint": combine(modules)})
    return EditPack(
        name=parent.name,
        version=version,
        method=method,
        hyperparameters=child.hyperparameters,
        facts=[f for f in parent.facts if fact_key(f) not in replaced] + list(child.facts),
        base=base,
        delta=delta,
        fan_in_fan_out=parent.fan_in_fan_out,
        parents=list(parent.requires) + [parent.lineage_record("extends")],
    )
