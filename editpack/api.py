"""``editpack.edit``: compute an edit on a model and return it as a pack (the model is left unchanged)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ._io import check_output, sha256_file
from .chat import chat_facts, check_plain_routing, check_same_form
from .errors import EditpackError, InvalidFactError
from .facts import Fact, check_consistent, facts_from_records, kept_indices, load_facts
from .methods import REGISTRY, get_method
from .methods.base import trainable_methods
from .methods.training import Trainer, TrainSettings
from .model.arch import spec_for
from .model.builtins import BUILTINS
from .model.fingerprint import combine, unwrap
from .model.loading import local_model_path
from .model.stats import AUTO_MAX_TOKENS, AUTO_TOLERANCE, StatsConfig, check_corpus_file, default_tokens
from .packs.artifact import Artifact
from .packs.base_model import BaseModel
from .packs.delta import WeightDelta
from .packs.manifest import check_version, slug
from .packs.statistics import StatsPack, save_to_store
from .packs.statistics import compute as compute_statistics
from .packs.weights import EditPack
from .paths import cache_dir
from .runtime.apply import applied, apply, revert
from .share.hub import resolve_pack


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


def model_tokenizer(model: torch.nn.Module, tokenizer=None):
    """``tokenizer``, else the one :func:`editpack.load_model` loaded with ``model``."""
    tokenizer = tokenizer or getattr(unwrap(model), "editpack_tokenizer", None)
    if tokenizer is None:
        raise EditpackError("no tokenizer: pass tokenizer=..., or load the model with editpack.load_model")
    return tokenizer


def method_config(method: str, model: torch.nn.Module | None = None, **hyperparameters: Any):
    """The method's class and its validated config: the family's defaults (when ``model`` is given), then
    ``hyperparameters``. Raises before any computation on an unknown method, setting or value type."""
    method_cls = get_method(method)
    defaults = spec_for(unwrap(model)).method_defaults(method) if model is not None else {}
    return method_cls, method_cls.config_class.from_dict({**defaults, **hyperparameters})


def edit(
    model: torch.nn.Module,
    facts: Any,
    method: str = "rome",
    *,
    tokenizer=None,
    name: str | None = None,
    version: str = "1.0.0",
    state: dict[str, torch.Tensor] | None = None,
    chat: bool = False,
    **hyperparameters: Any,
) -> Artifact:
    """Compute ``method``'s edit of ``model`` for ``facts`` and return it as an :class:`EditPack`.

    ``model`` is not changed (apply the pack with :func:`editpack.apply`). ``tokenizer`` defaults to the one
    :func:`editpack.load_model` loaded with the model. Remaining keyword arguments are the method's
    hyper-parameters (e.g. ``layers=[5]``, ``stats_corpus=path``); unknown ones are an error.

    ``model`` may carry packs (applied with :func:`editpack.apply`, merged or not): the edit is then computed on
    the edited model, holds only the change on top of them, and records them as parents that must be applied
    first (:attr:`EditPack.requires`). ``state`` is the method state of the pack being extended (see
    :func:`extend`, which is the usual way to edit sequentially).

    ``chat=True`` edits the facts in the tokenizer's chat form (:func:`editpack.chat.chat_fact`: each prompt a
    user turn, the answer after the assistant's header), as an instruct model behind its chat template reads
    them; the pack records the facts so. Methods that make memory packs take no chat form.
    """
    on_model = applied(model)
    if any(not r.enabled for r in on_model):
        off = [r.pack.ref for r in on_model if not r.enabled]
        raise EditpackError(f"packs {off} are switched off on this model; remove them or switch them on first")
    # Packs that change the logits (weights, codebooks) shape what an edit is computed on; memories route
    # generation only.
    parents = [r.pack.lineage_record("onto") for r in on_model if r.pack.scores_logits]
    model = unwrap(model)
    tokenizer = model_tokenizer(model, tokenizer)
    check_version(version)
    fact_list = as_facts(facts)
    check_consistent(fact_list)
    method_cls, config = method_config(method, model, **hyperparameters)
    if chat:
        check_plain_routing([method_cls])
        fact_list = chat_facts(tokenizer, fact_list)
    name = name or f"{method}-{slug(fact_list[0].subject)}" + (f"-and-{len(fact_list) - 1}-more" if len(fact_list) > 1 else "")
    pack = method_cls(config).build_pack(model, tokenizer, fact_list, spec_for(model), name=name, version=version,
                                         parents=parents, state=state)
    return with_method_notes(pack, method_cls)


def compute_stats(
    model: torch.nn.Module,
    method: str = "rome",
    *,
    layers: Sequence[int] | None = None,
    corpus: str | os.PathLike | None = None,
    tokens: int | str | None = None,
    tokenizer=None,
    name: str | None = None,
    version: str = "1.0.0",
    seed: int = 0,
) -> StatsPack:
    """Key statistics for ``method``'s layers on ``model`` (or ``layers``) as a statistics artifact, kept in the
    local cache as well (so later edits find them) and returned unsaved (``.save(dir)``; ``editpack push`` shares
    it). ``corpus``: a JSONL (``text`` field) or plain-text file; ``None`` samples text from the model. ``tokens``:
    how many keys to read (``None``: the methods' default, :func:`editpack.model.stats.default_tokens`), or ``"auto"``: until the solved update on held-out keys moves less than
    :data:`AUTO_TOLERANCE` between checkpoints (at most :data:`AUTO_MAX_TOKENS`)."""
    model = unwrap(model)
    tokenizer = model_tokenizer(model, tokenizer)
    check_version(version)
    method_cls, config = method_config(method, model, **({"layers": list(layers)} if layers is not None else {}))
    if not method_cls.takes("stats_corpus"):
        raise EditpackError(f"{method} uses no key statistics; methods that do: "
                            + ", ".join(sorted(m for m, c in REGISTRY.items() if c.takes("stats_corpus"))))
    spec = spec_for(model)
    chosen = method_cls(config).resolve_layers(model, spec)
    if tokens is None:
        tokens = default_tokens(corpus)
    if tokens == "auto":
        n_tokens, tolerance = AUTO_MAX_TOKENS, AUTO_TOLERANCE
    elif isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1:
        n_tokens, tolerance = tokens, None
    else:
        raise EditpackError(f"tokens must be a positive number or 'auto', not {tokens!r}")
    corpus_path = str(check_corpus_file(corpus).resolve()) if corpus is not None else None
    stats = StatsConfig(corpus=corpus_path, corpus_sha256=sha256_file(corpus_path) if corpus_path else None,
                        n_tokens=n_tokens, seed=seed, tolerance=tolerance)
    pack = compute_statistics(model, tokenizer, spec, chosen, stats, method=method, name=name, version=version)
    save_to_store(pack)
    return pack


def with_method_notes(pack: Artifact, method_cls) -> Artifact:
    """``pack`` with its method's caveat among its notes (an experimental method's measured reason), once."""
    if method_cls.experimental:
        note = f"{method_cls.name} is experimental: {method_cls.experimental}"
        if note not in pack.notes:
            pack.notes.append(note)
    return pack


def train(
    model: torch.nn.Module,
    method: str,
    records: Any,
    *,
    tokenizer=None,
    name: str | None = None,
    version: str = "1.0.0",
    settings: "TrainSettings | None" = None,
    checkpoint_dir: str | Path | None = None,
    data: list[dict[str, Any]] | None = None,
    progress: bool = True,
    chat: bool = False,
    **hyperparameters: Any,
) -> Artifact:
    """Train what ``method`` learns (MEND: an editor) on ``records`` (facts with paraphrases and neighbourhood
    prompts) and return it as an :class:`~editpack.packs.editor.Editor` artifact (not saved; call ``.save``).

    ``settings`` are the trainer's (steps, batch size, learning rate, seed, held-out size, checkpoint period:
    :class:`editpack.methods.training.TrainSettings`); ``checkpoint_dir`` makes the run resumable (the same call resumes
    from its last checkpoint); ``data`` describes the record files (name, sha256, records) for the manifest.
    Remaining keyword arguments are the method's settings (e.g. ``layers``, ``rank``). ``model`` is left as it was.
    ``chat=True`` trains on the records in the tokenizer's chat form (as :func:`edit` takes it); the editor's
    training section records ``"form": "chat"``.
    """
    model = unwrap(model)
    tokenizer = model_tokenizer(model, tokenizer)
    check_version(version)
    method_cls, config = method_config(method, model, **hyperparameters)
    if not method_cls.trainable:
        raise EditpackError(f"{method} learns nothing to train; methods that do: "
                            + ", ".join(trainable_methods()))
    settings = settings or TrainSettings()
    facts = chat_facts(tokenizer, as_facts(records)) if chat else as_facts(records)
    runner = method_cls(config)
    with torch.random.fork_rng(devices=[]):  # the learner's initial values follow the seed, not the caller's RNG
        torch.manual_seed(settings.seed)
        learner = runner.learner(model, tokenizer, spec_for(model))
    digest = hashlib.sha256(json.dumps([f.to_dict() for f in facts], sort_keys=True).encode()).hexdigest()
    identity = {"method": method, "config": dataclasses.asdict(config), "records": digest}
    result = Trainer(learner, facts, settings, checkpoint_dir=checkpoint_dir, progress=progress,
                     identity=identity).fit()
    training = {"data": data or [], **({"form": "chat"} if chat else {}), "records": len(facts), "seed": settings.seed,
                "batch_size": settings.batch_size, "lr": settings.lr,
                "held_out_records": len(result.held_out_indices), **result.summary()}
    ref = getattr(model, "editpack_ref", None)
    name = name or f"{method}-{slug(ref.id) if ref is not None else 'editor'}"
    return runner.editor_from(learner, name=name, version=version, training=training)


def inherited_settings(parent: Artifact | None, method: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters an edit on top of ``parent`` with ``method`` runs with: ``parent``'s own (when it was made
    by the same method and is not a stack of several) under the ones given; a statistics corpus given anew is
    hashed afresh."""
    inherited = (dict(parent.hyperparameters) if parent is not None and method == parent.method
                 and "stacked" not in parent.hyperparameters else {})
    if "stats_corpus" in hyperparameters:
        inherited.pop("stats_corpus_sha256", None)
    return {**inherited, **hyperparameters}


def check_destination(output: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[Any] = (),
                      model: str | None = None) -> Path:
    """Raise before any work unless ``output`` may be written: absent, or with ``overwrite`` a directory editpack
    wrote (:func:`editpack._io.check_output`); none of the inputs (packs or their folders, and the model's folder or
    file when ``model`` names one here) and neither inside one nor holding one; and not inside editpack's cache of
    converted models. ``FileExistsError`` for an output that exists, ``EditpackError`` for the rest."""
    target = Path(output).resolve()
    paths = [getattr(item, "path", None) or (Path(item) if Path(str(item)).exists() else None) for item in inputs]
    if model:
        paths.append(local_model_path(model))
    for path in paths:
        if path is None:
            continue
        path = Path(path).resolve()
        how = ("is an input" if path == target else f"lies inside {path}, an input" if path in target.parents
               else f"holds {path}, an input" if target in path.parents else None)
        if how:
            raise EditpackError(f"{output} {how} of this command; write the result elsewhere")
    models = cache_dir("models").resolve()
    if target == models or models in target.parents:
        raise EditpackError(f"{output} is inside editpack's cache of converted models ({models}); write the "
                            "result elsewhere")
    return check_output(output, overwrite=overwrite)


def base_model_name(packs: Sequence[Artifact]) -> str | None:
    """The model to load for ``packs`` when none is named: the base the first one records, a built-in or a Hub
    id (``None`` without packs). Packs record no local paths, so a base that was a local folder or GGUF file
    must be named by the caller."""
    if not packs:
        return None
    base = packs[0].base
    if base.id in BUILTINS or base.hub_id == base.id or Path(base.id).exists():
        return base.id
    raise EditpackError(f"{packs[0].ref} was made on {base.id!r}, a local model on the machine that made it; "
                        "pass --model with that model's folder or file here (model= in Python)")


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
    chat: bool = False,
    **hyperparameters: Any,
) -> Artifact:
    """The next version of ``pack``: ``facts`` edited on ``model`` with ``pack`` applied, combined with it.

    Sequential editing: the new facts are computed on the model as ``pack`` leaves it (with the method state
    ``pack`` carries, e.g. AlphaEdit's earlier keys), and the result holds both deltas, all facts (a new fact
    replaces an earlier one about the same subject and relation), the method's new state, and ``pack`` as its
    ``extends`` parent. It applies to the base model on its own. ``method`` and hyper-parameters default to
    ``pack``'s; ``version`` to the next minor version. ``model`` must carry no packs (it is left unchanged).
    A codebook (GRACE) grows by new entries, computed on ``model`` and inserted by the method's deferral rules;
    an artifact that holds neither weights nor a codebook (a memory pack) grows by its facts alone.
    ``chat=True``: the new facts in the tokenizer's chat form, as :func:`edit` takes them.
    """
    parent = resolve_pack(pack)
    facts = as_facts(facts)
    check_consistent(facts)
    if applied(model):
        raise EditpackError("extend() applies the pack itself: pass the model without packs")
    if chat:
        check_plain_routing([parent])
    if not parent.routes_text:  # a memory pack's facts are plain (just checked) and it grows without a tokenizer
        tokenizer = model_tokenizer(model, tokenizer)
        check_same_form(tokenizer, parent.facts, chat, parent.ref)
    if chat:
        facts = chat_facts(tokenizer, as_facts(facts))
    if parent.hooks_modules:  # a codebook grows by entries computed on the model it wraps
        if method not in (None, parent.method):
            raise EditpackError(f"{parent.ref} is a {parent.kind} pack made by {parent.method}; it grows with "
                                f"{parent.method} only")
        version = check_version(version or next_version(parent.version))
        method_cls, config = method_config(parent.method, model, **{**parent.hyperparameters, **hyperparameters})
        return with_method_notes(method_cls(config).build_pack(
            unwrap(model), tokenizer, as_facts(facts), spec_for(unwrap(model)), name=parent.name, version=version,
            parents=list(parent.requires) + [parent.lineage_record("extends")], previous=parent), method_cls)
    if not parent.holds_weights:
        if method not in (None, parent.method) or hyperparameters:
            raise EditpackError(f"{parent.ref} is a {parent.kind} pack: it is extended with more facts only")
        return parent.with_facts(add=as_facts(facts), version=version or next_version(parent.version))
    method = method or parent.method
    base_hparams = inherited_settings(parent, method, hyperparameters)
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
    modules = {**(parent.base.modules or {}), **(child.base.modules or {})}
    norms = {**(parent.base.norms or {}), **(child.base.norms or {})}
    base = BaseModel(**{**parent.base.to_dict(), "modules": modules, "fingerprint": combine(modules),
                        "norms": norms or None})
    return EditPack(
        name=parent.name,
        version=version,
        method=method,
        hyperparameters=child.hyperparameters,
        facts=[parent.facts[i] for i in kept_indices(parent.facts, child.facts)] + list(child.facts),
        base=base,
        delta=delta,
        fan_in_fan_out=parent.fan_in_fan_out,
        parents=list(parent.requires) + [parent.lineage_record("extends")],
        notes=list(child.notes),
    )


def forget(pack: Any, subjects: Any, *, version: str | None = None) -> Artifact:
    """The next version of ``pack`` without the facts about ``subjects`` (memory packs; a weight delta cannot drop
    single facts, so weight packs are refused with the way out: edit again)."""
    parent = resolve_pack(pack)
    subjects = [subjects] if isinstance(subjects, str) else list(subjects)
    if not subjects:
        raise EditpackError("name at least one subject to forget")
    return parent.with_facts(remove=subjects, version=version or next_version(parent.version))
