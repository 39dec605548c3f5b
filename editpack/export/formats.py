"""Packs for the runtimes that serve models: multi-LoRA servers (vLLM, SGLang, LoRAX, TGI) and llama.cpp (GGUF).

A weight pack is already a PEFT adapter, but one that relies on PEFT's per-module ``rank_pattern``/``alpha_pattern``
to keep every module's scale at exactly 1. Serving engines read less than PEFT does; what each reads is data, one
file per engine in ``editpack/engines/`` with the source it comes from (:class:`EngineRules`). :func:`export_peft`
writes an adapter that meets an engine's rules and means exactly the pack:

- one rank ``R`` for every module (zero columns pad smaller factors; ``R`` at least the engine's minimum),
  ``r = lora_alpha = R`` and no patterns, so the single global scale is exactly 1;
- a module type present in every layer where the engine needs that, and q/k/v or gate/up together where it
  stacks them (zero factors, which add nothing);
- ranks over the engine's maximum refused, unless the delta's numerical rank fits (a dense-stored delta is then
  re-factored exactly by SVD).

Several packs export as one adapter (their factors concatenated: the sum of their deltas). :func:`check_export`
checks a folder against an engine's rules and lists what breaks them.

:func:`export_gguf` writes a llama.cpp LoRA adapter (``general.type = adapter``) with the base GGUF's tensor names
(the ``gguf`` section of the architecture file says which modules map without a transform), one rank and
``adapter.lora.alpha`` equal to it, so llama.cpp's per-tensor scale alpha / rank is exactly 1; or, with
``merged=True`` and the base GGUF, a whole edited model in the base file's tensor types where the edit survives
requantization (otherwise F16, then F32: each choice is reported).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from .._io import atomic_directory, atomic_file, atomic_write_json, read_safetensors, write_safetensors
from ..model.arch import ArchSpec, spec_for_model_type
from ..packs.delta import LowRankDelta
from ..errors import EditpackError
from ..packs.weights import ADAPTER_KEY, EditPack, lora_state_dict

EXPORT_RECORD = "editpack_export.json"
GGUF_RETAINED = 0.9  # share of an edit a requantized tensor must keep (1 - relative error of the delta)


class ExportError(EditpackError):
    """A pack cannot be written in the form a runtime reads."""


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


# ---------------------------------------------------------------------------------------------- the delta
@dataclass
class Export:
    """What an export wrote: the folder or file, the rank, the modules, the bytes, and notes for the user."""

    path: Path
    target: str
    rank: int
    modules: list[str]
    bytes: int
    notes: list[str] = field(default_factory=list)


def _weight_packs(packs, on_conflict: str = "error") -> list[EditPack]:
    """The packs to export as one adapter: :func:`editpack.apply`'s and :func:`editpack.stack`'s rules (no pack
    twice, conflicts refused or the later pack winning, one base), and weight packs only."""
    from ..runtime.apply import _as_packs, check_stackable, resolve_conflicts

    loaded = _as_packs(packs)
    if not loaded:
        raise ExportError("no pack to export")
    wrong = [p.ref for p in loaded if not p.holds_weights]
    if wrong:
        raise ExportError(f"{', '.join(wrong)} hold no weight delta an engine can load as is (memory, codebook and "
                          "side-memory packs route inputs at run time, which no serving engine does); export weight "
                          "packs")
    bases = {(p.base.id, p.base.model_type) for p in loaded}
    if len(bases) > 1:
        raise ExportError(f"the packs were made for different models ({sorted(bases)}); export them separately")
    if any(p.fan_in_fan_out for p in loaded):
        raise ExportError("packs of transposed (Conv1D, GPT-2 style) layers cannot be exported for serving engines")
    loaded = resolve_conflicts(loaded, on_conflict)
    check_stackable(loaded)
    return loaded


def combined_delta(packs: Sequence[EditPack]) -> dict[str, LowRankDelta]:
    """Every pack's stored factors, concatenated per module: the sum of the packs' deltas, exactly."""
    out: dict[str, LowRankDelta] = {}
    for pack in packs:
        for name, delta in pack.stored_factors().items():
            delta = LowRankDelta(delta.B.float(), delta.A.float())
            out[name] = out[name].concat(delta) if name in out else delta
    return out


def _fit_rank(name: str, delta: LowRankDelta, limit: int | None, target: str) -> LowRankDelta:
    """``delta`` itself when its rank is within ``limit``, else exact SVD factors if its numerical rank fits."""
    if limit is None or delta.rank <= limit:
        return delta
    u, s, vh = torch.linalg.svd(delta.dense().double(), full_matrices=False)
    keep = int((s > s[0] * 1e-7).sum()) if s.numel() and s[0] > 0 else 0
    if keep > limit:
        raise ExportError(f"{name} has rank {keep} (of {delta.rank} stored), over {target}'s maximum of {limit}; "
                          "export fewer packs together, or a pack whose delta is low-rank")
    keep = max(keep, 1)
    return LowRankDelta(B=(u[:, :keep] * s[:keep]).float(), A=vh[:keep].float())


def _pad(delta: LowRankDelta, rank: int) -> LowRankDelta:
    extra = rank - delta.rank
    if extra <= 0:
        return delta
    return LowRankDelta(B=torch.cat([delta.B, delta.B.new_zeros(delta.B.shape[0], extra)], dim=1),
                        A=torch.cat([delta.A, delta.A.new_zeros(extra, delta.A.shape[1])], dim=0))


def _split(spec: ArchSpec, name: str) -> tuple[int, str]:
    """``(layer, suffix)`` of a module inside the decoder blocks (``model.layers.5.mlp.down_proj`` → 5, mlp.down_proj)."""
    layer = spec.block_of(name)
    if layer is None:
        raise ExportError(f"{name} is not inside the decoder blocks ({spec.blocks}); engines address LoRA by layer")
    return layer, name[len(spec.block_name(layer)) + 1:]


def _num_layers(model: str | None, packs: Sequence[EditPack]) -> int:
    """The base model's depth, from ``model`` or the packs' base (its config only)."""
    from transformers import AutoConfig

    from ..model.loading import resolve_model

    source = model or packs[0].base.id
    try:
        config = AutoConfig.from_pretrained(resolve_model(source).path)
    except Exception as exc:  # noqa: BLE001  (any failure to find the config says the same thing to the user)
        raise ExportError(f"this export needs the base model's number of layers and cannot read the config of "
                          f"{source!r} ({exc.__class__.__name__}); pass the base model (--model)") from None
    config = getattr(config, "text_config", None) or config
    return int(config.num_hidden_layers)


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
    loaded = _weight_packs(packs, on_conflict)
    spec = spec_for_model_type(loaded[0].base.model_type)
    deltas = {name: _fit_rank(name, d, rules.max_rank, rules.title) for name, d in combined_delta(loaded).items()}
    notes: list[str] = []
    placed = {name: _split(spec, name) for name in deltas}
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
        depth = num_layers or _num_layers(model, loaded)
        suffixes = sorted({_split(spec, name)[1] for name in deltas})
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
    state = lora_state_dict({name: _pad(deltas[name], rank) for name in sorted(deltas)})
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


# ---------------------------------------------------------------------------------------------- GGUF
def _gguf():
    try:
        import gguf
    except ImportError:
        from ..errors import MissingPackageError

        raise MissingPackageError("GGUF export needs the gguf package: pip install 'editpack[gguf]'") from None
    return gguf


def _gguf_names(spec: ArchSpec, modules: Sequence[str], n_blocks: int) -> dict[str, str]:
    """``{module: GGUF tensor name}`` (e.g. ``blk.5.ffn_down.weight``) by the gguf package's own name map."""
    gguf = _gguf()
    if not spec.gguf:
        raise ExportError(f"the {spec.family} architecture file has no gguf section; GGUF export is not mapped for it")
    arch_name = spec.gguf["arch"]
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise ExportError(f"the gguf package does not know the architecture {arch_name!r}")
    table = gguf.get_tensor_name_map(arch, n_blocks)
    plain = set(spec.gguf.get("plain_modules", []))
    out = {}
    for name in modules:
        layer, suffix = _split(spec, name)
        if suffix not in plain:
            raise ExportError(f"{name}: llama.cpp's converter does not copy {suffix} as it is for {arch_name}, so a "
                              f"LoRA of it cannot be mapped (mapped: {', '.join(sorted(plain))})")
        mapped = table.get_name(name)
        if mapped is None:
            raise ExportError(f"the gguf package has no {arch_name} tensor for {name}")
        out[name] = mapped + ".weight"
    return out


def _gguf_base(path: str | os.PathLike):
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    field_ = reader.fields.get("general.architecture")
    arch = field_.contents() if field_ is not None else None
    return reader, arch


def _editpack_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file editpack wrote (its metadata names the packs it holds)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                return False
        return "editpack.packs" in _gguf().GGUFReader(str(path)).fields
    except (OSError, ValueError, KeyError, IndexError):  # not a readable GGUF
        return False


def check_gguf_output(output: str | os.PathLike, *, overwrite: bool = False,
                      inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Raise unless ``output`` may be written as a GGUF file, before any work: not a link or a folder, not inside
    one of ``inputs`` (the packs' folders) nor one of them (the base GGUF), and, when it exists, replaced only with
    ``overwrite`` and only if it is a GGUF file editpack wrote (a user's other files are never replaced)."""
    from .._io import check_output

    output = Path(output)
    if output.is_symlink() or output.is_dir():
        raise FileExistsError(f"{output} is a {'link' if output.is_symlink() else 'directory'}; refusing to write there")
    target = output.resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == target or path in target.parents:
            raise FileExistsError(f"{output} is {'an input' if path == target else f'inside {item}, an input'} of "
                                  "this export; write it elsewhere")
    if output.exists():
        if not overwrite:
            raise FileExistsError(f"{output} already exists (pass overwrite=True / --overwrite to replace it)")
        if not _editpack_gguf(output):
            raise FileExistsError(f"{output} is not a GGUF file editpack wrote; refusing to replace it with "
                                  "--overwrite")
        return output
    return check_output(output)  # the parent: a writable directory


def _write_atomic_file(output: Path, overwrite: bool, write) -> None:
    """``write(tmp)`` a file that replaces ``output`` atomically; an existing file only with ``overwrite``."""
    output = check_gguf_output(output, overwrite=overwrite)
    with atomic_file(output) as tmp:
        write(tmp)


def _metadata(writer, packs: Sequence[EditPack]) -> None:
    writer.add_string("general.name", " + ".join(f"{p.name} {p.version}" for p in packs))
    writer.add_string("editpack.packs", json.dumps([{"name": p.name, "version": p.version, "content": p.content_id}
                                                    for p in packs]))
    writer.add_string("editpack.pack.name", packs[0].name if len(packs) == 1 else "stack")
    writer.add_string("editpack.pack.version", packs[0].version if len(packs) == 1 else "")
    writer.add_string("editpack.pack.content", packs[0].content_id if len(packs) == 1 else
                      "sha256:" + hashlib.sha256("".join(p.content_id for p in packs).encode()).hexdigest())


def export_gguf(packs, output: str | os.PathLike, *, base: str | os.PathLike | None = None, merged: bool = False,
                overwrite: bool = False, on_conflict: str = "error") -> Export:
    """Write ``packs`` as a llama.cpp GGUF LoRA adapter, or (``merged=True``, needs ``base``) a whole edited GGUF.

    With ``base`` (the base model's GGUF file), the architecture and every tensor's shape are checked against it.
    """
    gguf = _gguf()
    loaded = _weight_packs(packs, on_conflict)
    check_gguf_output(output, overwrite=overwrite,
                      inputs=[p.path for p in loaded if p.path is not None] + ([base] if base is not None else []))
    spec = spec_for_model_type(loaded[0].base.model_type)
    deltas = combined_delta(loaded)
    reader = None
    if base is not None:
        reader, arch = _gguf_base(base)
        if spec.gguf and arch != spec.gguf.get("arch"):
            raise ExportError(f"{Path(base).name} is a {arch!r} GGUF, but the packs were made for a "
                              f"{spec.gguf.get('arch')!r} model")
    elif merged:
        raise ExportError("a merged GGUF is written from the base model's GGUF: pass it (--base MODEL.gguf)")
    depth = 1 + max(_split(spec, name)[0] for name in deltas)
    if reader is not None:
        block_count = reader.fields.get(f"{spec.gguf['arch']}.block_count")
        depth = max(depth, int(block_count.contents())) if block_count is not None else depth
    names = _gguf_names(spec, list(deltas), depth)
    base_tensors = {t.name: t for t in reader.tensors} if reader is not None else {}
    for module, tensor_name in names.items():
        if reader is not None:
            if tensor_name not in base_tensors:
                raise ExportError(f"{Path(base).name} has no tensor {tensor_name} (for {module})")
            shape = tuple(int(x) for x in reversed(base_tensors[tensor_name].shape.tolist()))  # ggml ne → (out, in)
            want = (deltas[module].B.shape[0], deltas[module].A.shape[1])
            if shape != want:
                raise ExportError(f"{tensor_name} is {shape} in {Path(base).name} but {want} in the pack")
    if merged:
        return _export_merged_gguf(loaded, deltas, names, reader, Path(output), overwrite)
    rank = max(d.rank for d in deltas.values())

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), spec.gguf["arch"])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))  # alpha / rank = 1 for every tensor
        _metadata(writer, loaded)
        for module in sorted(deltas):
            padded = _pad(deltas[module], rank)
            writer.add_tensor(names[module] + ".lora_a", padded.A.numpy())  # (rank, in): ne = [in, rank]
            writer.add_tensor(names[module] + ".lora_b", padded.B.numpy())  # (out, rank): ne = [rank, out]
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _write_atomic_file(Path(output), overwrite, write)
    return Export(Path(output), "gguf", rank, sorted(deltas), Path(output).stat().st_size,
                  [f"llama.cpp scale alpha/rank = {rank}/{rank} = 1 for every tensor"])


def _requantized(gguf, weight, delta, qtypes) -> tuple[Any, Any, float, dict]:
    """The first of ``qtypes`` whose requantized ``weight + delta`` keeps at least :data:`GGUF_RETAINED` of
    ``delta``: ``(type, data, retained, {type tried: share kept, or None where the gguf package cannot
    quantize it})``; F32 always qualifies."""
    import numpy as np

    target = weight + delta
    norm = float(np.linalg.norm(delta)) or 1.0
    tried: dict = {}
    for qtype in qtypes:
        if qtype == gguf.GGMLQuantizationType.F32:
            return qtype, target.astype(np.float32), 1.0, tried
        try:
            data = gguf.quants.quantize(target, qtype)
            back = gguf.quants.dequantize(data, qtype)
        except (NotImplementedError, gguf.quants.QuantError, ValueError):
            tried[qtype] = None
            continue
        retained = 1.0 - float(np.linalg.norm(back - weight - delta)) / norm
        if retained >= GGUF_RETAINED:
            return qtype, data, retained, tried
        tried[qtype] = retained
    raise AssertionError("unreachable: F32 is always a candidate")


def _export_merged_gguf(packs, deltas, names, reader, output: Path, overwrite: bool) -> Export:
    gguf = _gguf()
    by_tensor = {names[m]: m for m in deltas}
    edited: dict[str, tuple[Any, Any]] = {}
    notes: list[str] = []
    for tensor in reader.tensors:
        module = by_tensor.get(tensor.name)
        if module is None:
            continue
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
            tuple(reversed(tensor.shape.tolist()))).astype("float32")
        delta = deltas[module].dense().numpy().astype("float32")
        qtype, data, retained, tried = _requantized(
            gguf, weight, delta, [tensor.tensor_type, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32])
        edited[tensor.name] = (qtype, data)
        if qtype == tensor.tensor_type:
            notes.append(f"{tensor.name}: {qtype.name} as in the base (keeps {retained:.1%} of the edit)")
        else:
            why = "; ".join(f"{t.name} is not implemented in the gguf package" if kept is None else
                            f"{t.name} keeps {kept:.1%} of the edit (under {GGUF_RETAINED:.0%})"
                            for t, kept in tried.items())
            notes.append(f"{tensor.name}: {qtype.name} instead of the base's {tensor.tensor_type.name}: {why}")

    def write(tmp: Path) -> None:
        arch = reader.fields["general.architecture"].contents()
        writer = gguf.GGUFWriter(str(tmp), arch)
        for fld in reader.fields.values():
            if fld.name == gguf.Keys.General.ARCHITECTURE or fld.name.startswith("GGUF."):
                continue
            if fld.name in ("general.name",) or fld.name.startswith("editpack."):
                continue
            value_type = fld.types[0]
            sub_type = fld.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(fld.name, fld.contents(), value_type, sub_type=sub_type)
        _metadata(writer, packs)
        for tensor in reader.tensors:
            if tensor.name in edited:
                qtype, data = edited[tensor.name]
                writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes,
                                       qtype if qtype != gguf.GGMLQuantizationType.F32 else None)
            else:
                writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                       tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            data = edited[tensor.name][1] if tensor.name in edited else tensor.data
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()

    _write_atomic_file(output, overwrite, write)
    return Export(output, "gguf-merged", 0, sorted(deltas), output.stat().st_size, notes)
