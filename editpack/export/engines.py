"""Packs for multi-LoRA serving engines (vLLM, SGLang, LoRAX, TGI).

A weight pack is already a PEFT adapter, but one that relies on PEFT's per-module ``rank_pattern``/``alpha_pattern``
to keep every module's scale at exactly 1. Serving engines read less than PEFT does; what each reads is data, one
file per engine in ``editpack/export/rules/`` with the source it comes from (:class:`EngineRules`). :func:`export_peft`
writes an adapter that meets an engine's rules and means exactly the pack:

- one rank ``R`` for every module (zero columns pad smaller factors; ``R`` at least the engine's minimum),
  ``r = lora_alpha = R`` and no patterns, so the single global scale is exactly 1;
- a module type present in every layer where the engine needs that, and q/k/v or gate/up together where it
  stacks them (zero factors, which add nothing);
- ranks over the engine's maximum refused, unless the delta's numerical rank fits (a dense-stored delta is then
  re-factored exactly by SVD).

Several packs export as one adapter (their factors concatenated: the sum of their deltas). :func:`check_export`
checks a folder against an engine's rules and lists what breaks them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_directory, atomic_write_json, read_safetensors, write_safetensors
from ..model.arch import spec_for_model_type
from ..packs.delta import LowRankDelta
from ..packs.weights import ADAPTER_KEY, lora_state_dict
from .common import (
    EXPORT_RECORD,
    Export,
    ExportError,
    combined_delta,
    fit_rank,
    layer_of,
    num_layers_of,
    pad_rank,
    weight_packs,
)


# ---------------------------------------------------------------------------------------------- engine rules
@dataclass(frozen=True)
class EngineRules:
    """How one serving engine reads a PEFT LoRA adapter (``editpack/engines/<engine>.json``)."""

    engine: str
    title: str
    sources: tuple[str, ...]
    #: One scale ``lora_alpha / r`` for the whole adapter; ``rank_pattern``/``alpha_pattern`` are not read.
    global_scale: bool
    #: Every module's factors must have rank ``r`` (the engine stacks or pools them by ``r``).
    uniform_rank: bool
    #: The values the server's maximum rank setting may take (``None``: any).
    rank_choices: tuple[int, ...] | None
    min_rank: int
    max_rank: int | None
    #: A module type the adapter targets must have weights in every layer, or the engine skips it.
    every_layer: bool
    #: Module suffixes (after the layer) the engine stacks per layer: a layer with one needs all of them.
    stacked_groups: tuple[tuple[str, ...], ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "EngineRules":
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data) - {"stacked_groups"})
        if unknown or missing:
            raise ValueError(f"engine rules {source}: unknown keys {unknown}, missing keys {missing}")
        values = dict(data)
        values["sources"] = tuple(values["sources"])
        values["rank_choices"] = tuple(values["rank_choices"]) if values["rank_choices"] else None
        values["stacked_groups"] = tuple(tuple(g) for g in values.get("stacked_groups") or ())
        return cls(**values)

    def server_rank(self, rank: int) -> int | None:
        """The smallest maximum-rank setting of the server that admits ``rank`` (``None``: no setting needed)."""
        if not self.rank_choices:
            return None
        fitting = [choice for choice in self.rank_choices if choice >= rank]
        return min(fitting) if fitting else None


@lru_cache(maxsize=None)
def _all_engines() -> dict[str, EngineRules]:
    out = {}
    for entry in sorted(resources.files("editpack.export.rules").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            rules = EngineRules.from_dict(json.loads(entry.read_text(encoding="utf-8")), entry.name)
            out[rules.engine] = rules
    return out


def engines() -> list[str]:
    """The serving engines editpack can export for."""
    return sorted(_all_engines())


def engine_rules(engine: str) -> EngineRules:
    try:
        return _all_engines()[engine]
    except KeyError:
        raise ExportError(f"unknown engine {engine!r}; known: {', '.join(engines())}, and gguf") from None


# ---------------------------------------------------------------------------------------------- PEFT for engines
def export_peft(packs, engine: str, output: str | os.PathLike, *, model: str | None = None,
                num_layers: int | None = None, overwrite: bool = False, on_conflict: str = "error") -> Export:
    """Write ``packs`` (one or several, as one adapter) as a PEFT LoRA folder that ``engine`` loads as is.

    ``num_layers`` (or ``model``, whose config gives it; by default the packs' base) is needed only by engines
    that want every layer present. The folder is written atomically and records what it holds in
    ``editpack_export.json`` (packs' names, versions and content hashes, the engine and its rules' sources).
    Packs combine as :func:`editpack.stack` combines them (``on_conflict="later"``: a later pack wins).
    """
    rules = engine_rules(engine)
    loaded = weight_packs(packs, on_conflict)
    stacked = [p.ref for p in loaded if p.stacked_modules]
    if stacked:
        raise ExportError(f"{', '.join(stacked)} edit stacked Mixture-of-Experts experts (a PEFT LoRA on parameters); "
                          f"editpack's rules for {rules.title} describe LoRA on layers only, so write the edited "
                          "model instead (`editpack apply … -o DIR`, merged into the weights)")
    spec = spec_for_model_type(loaded[0].base.model_type)
    deltas = {name: fit_rank(name, d, rules.max_rank, rules.title) for name, d in combined_delta(loaded).items()}
    notes: list[str] = []
    placed = {name: layer_of(spec, name) for name in deltas}
    shapes = {placed[name][1]: (d.B.shape[0], d.A.shape[1]) for name, d in deltas.items()}

    def zero(suffix: str) -> LowRankDelta:
        out_features, in_features = shapes[suffix]
        return LowRankDelta(B=torch.zeros(out_features, 1), A=torch.zeros(1, in_features))

    layers_of = {layer for layer, _ in placed.values()}
    for group in rules.stacked_groups:
        for layer in sorted(layers_of):
            have = [s for s in group if (layer, s) in placed.values()]
            missing = [s for s in group if s not in have]
            if have and missing:
                unknown = [s for s in missing if s not in shapes]
                if unknown:
                    raise ExportError(f"{rules.title} stacks {', '.join(group)} per layer; this pack has no shape for "
                                      f"{', '.join(unknown)}")
                for suffix in missing:
                    deltas[f"{spec.block_name(layer)}.{suffix}"] = zero(suffix)
                notes.append(f"layer {layer}: zero factors for {', '.join(missing)} ({rules.title} stacks "
                             f"{'/'.join(s.split('.')[-1] for s in group)})")
    if rules.every_layer:
        depth = num_layers or num_layers_of(model, loaded)
        suffixes = sorted({layer_of(spec, name)[1] for name in deltas})
        added = 0
        for suffix in suffixes:
            for layer in range(depth):
                name = f"{spec.block_name(layer)}.{suffix}"
                if name not in deltas:
                    deltas[name] = zero(suffix)
                    added += 1
        if added:
            notes.append(f"zero factors for {added} module(s) so every one of the {depth} layers has "
                         f"{', '.join(s.split('.')[-1] for s in suffixes)} ({rules.title} skips a module type that "
                         "lacks a layer)")
    rank = max(max(d.rank for d in deltas.values()), rules.min_rank)
    if rules.max_rank is not None and rank > rules.max_rank:
        raise ExportError(f"rank {rank} is over {rules.title}'s maximum of {rules.max_rank}")
    state = lora_state_dict({name: pad_rank(deltas[name], rank) for name in sorted(deltas)})
    server = rules.server_rank(rank)
    if server is not None:
        notes.append(f"serve with a maximum LoRA rank of at least {server} (e.g. vLLM --max-lora-rank {server})")
    targets = sorted({name.split(".")[-1] for name in deltas})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "target_modules": targets,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": loaded[0].base.peft_name, "revision": None,
    }
    record = {
        "format": 1, "target": engine, "engine_sources": list(rules.sources), "rank": rank,
        "base_model": loaded[0].base.to_dict(),
        "packs": [{"name": p.name, "version": p.version, "content": p.content_id} for p in loaded],
        "notes": notes,
    }
    with atomic_directory(Path(output), overwrite=overwrite) as tmp:
        write_safetensors(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", config)
        atomic_write_json(tmp / EXPORT_RECORD, record)
    size = sum(f.stat().st_size for f in Path(output).iterdir() if f.is_file())
    return Export(Path(output), engine, rank, sorted(deltas), size, notes)


def check_export(directory: str | os.PathLike, engine: str, *, num_layers: int | None = None,
                 model_type: str | None = None) -> list[str]:
    """What in the PEFT folder ``directory`` breaks ``engine``'s rules (an empty list: nothing).

    ``num_layers`` is needed to check an engine that wants every layer; ``model_type`` (default: the export
    record's base) places modules in layers.
    """
    rules = engine_rules(engine)
    directory = Path(directory)
    problems: list[str] = []
    config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    state = read_safetensors(directory / "adapter_model.safetensors")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not LORA")
    if rules.global_scale:
        if not r or alpha / r != 1:
            problems.append(f"lora_alpha / r = {alpha}/{r} is not 1, and {rules.title} scales every module by it")
        for key in ("rank_pattern", "alpha_pattern"):
            if config.get(key):
                problems.append(f"{key} is set, and {rules.title} does not read it")
    for key in ("use_rslora", "use_dora"):
        if config.get(key):
            problems.append(f"{key} is on")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config.get('bias')!r}")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = ADAPTER_KEY.match(key)
        if not match:
            problems.append(f"tensor {key} is not named base_model.model.<module>.lora_A/B.weight")
            continue
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
        if not torch.isfinite(tensor).all():
            problems.append(f"{key} holds non-finite values")
    targets = set(config.get("target_modules") or [])
    spec = None
    if model_type is None and (directory / EXPORT_RECORD).is_file():
        model_type = json.loads((directory / EXPORT_RECORD).read_text(encoding="utf-8"))["base_model"]["model_type"]
    if model_type:
        spec = spec_for_model_type(model_type)
    layers: dict[str, set[int]] = {}
    present: dict[int, set[str]] = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"{module} lacks lora_{'A' if 'A' not in pair else 'B'}")
            continue
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        if b.shape[1] != rank:
            problems.append(f"{module}: lora_B {tuple(b.shape)} does not chain with lora_A {tuple(a.shape)}")
        if rules.uniform_rank and rank != r:
            problems.append(f"{module} has rank {rank}, not the adapter's r = {r}")
        if rank < rules.min_rank:
            problems.append(f"{module} has rank {rank}, below {rules.title}'s minimum of {rules.min_rank}")
        if rules.max_rank is not None and rank > rules.max_rank:
            problems.append(f"{module} has rank {rank}, over {rules.title}'s maximum of {rules.max_rank}")
        if rules.rank_choices and rules.server_rank(rank) is None:
            problems.append(f"{module} has rank {rank}, over every maximum-rank setting of {rules.title}")
        if module.split(".")[-1] not in targets and module not in targets:
            problems.append(f"{module} is not among target_modules {sorted(targets)}")
        if spec is not None:
            layer = spec.block_of(module)
            if layer is None:
                problems.append(f"{module} is not inside the decoder blocks, where {rules.title} looks for LoRA")
                continue
            suffix = module[len(spec.block_name(layer)) + 1:]
            layers.setdefault(suffix, set()).add(layer)
            present.setdefault(layer, set()).add(suffix)
    if rules.every_layer:
        if num_layers is None:
            problems.append(f"cannot check that every layer is present for {rules.title} without the model's depth")
        else:
            for suffix, have in sorted(layers.items()):
                missing = sorted(set(range(num_layers)) - have)
                if missing:
                    problems.append(f"{suffix} lacks layers {missing[:8]}{'…' if len(missing) > 8 else ''}, so "
                                    f"{rules.title} skips it")
    for group in rules.stacked_groups:
        for layer, suffixes in sorted(present.items()):
            have = [s for s in group if s in suffixes]
            if have and len(have) < len(group):
                problems.append(f"layer {layer} has {', '.join(have)} but not all of {', '.join(group)}, which "
                                f"{rules.title} stacks")
    return problems
