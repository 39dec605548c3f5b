"""Key statistics as an artifact: the second moments ``E[k kᵀ]`` of the keys locate-then-edit methods solve under,
computed once, cached, shared on the Hub like packs, and refused for other weights.

A statistics directory holds ``statistics.safetensors`` (one float32 matrix per module, named by the module),
``editpack.json`` (kind ``statistics``: the model, for each module its layer, width, cache key and the fingerprint
of every weight that shapes its keys, the corpus by name and sha256 or the seed of the model's own samples, the
tokens used, how they were accumulated) and ``README.md`` (its card).

The local cache is the same format: ``$EDITPACK_HOME/stats`` holds statistics directories, and an edit looks a
module's statistics up there by its key (:func:`cached_moments`). ``editpack stats compute`` writes a directory and
fills the cache with it; a directory pulled from the Hub or named by ``edit --stats`` is installed into the cache
(:func:`install`) after its fingerprints are checked against the model, so later edits find it without being told.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import torch

from .._io import atomic_directory, read_safetensors, sha256_file, waiting_lock, write_safetensors
from ..errors import FingerprintMismatchError, PackFormatError
from ..model.arch import ArchSpec
from ..model.fingerprint import adapters_disabled, combine
from ..model.stats import StatsConfig, compute_second_moments, corpus_description, stats_key
from ..paths import cache_dir
from .artifact import Artifact, load_pack, register_kind
from .base_model import BaseModel, describe_base
from .manifest import MANIFEST, content_digest, read_manifest, section

STATISTICS = "statistics.safetensors"
log = logging.getLogger(__name__)


@register_kind
@dataclass(kw_only=True)
class StatsPack(Artifact):
    """Key statistics of one or more modules of one model, over one corpus (or the model's own samples)."""

    #: ``{module: E[k kᵀ]}`` (float32, square).
    moments: dict[str, torch.Tensor]
    #: ``{module: {"layer", "key", "upstream"}}``: the cache key and the fingerprint of the weights shaping it.
    entries: dict[str, dict[str, Any]]
    #: Where the keys came from and how many (the manifest's ``statistics.source``): ``corpus`` (name, sha256) or
    #: ``sampled`` (seed), ``tokens`` used,
    #: ``n_tokens`` asked (or the stopping rule), ``max_length``, how they were accumulated.
    provenance: dict[str, Any] = field(default_factory=dict)
    facts: list = field(default_factory=list)

    kind: ClassVar[str] = "statistics"
    payload_files: ClassVar[tuple[str, ...]] = (STATISTICS,)
    card_tag: ClassVar[str] = "key-statistics"
    card_template: ClassVar[str] = "statistics_card.md"
    appliable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.facts:
            raise PackFormatError(f"statistics {self.name}: statistics hold no facts")
        if set(self.moments) != set(self.entries) or not self.moments:
            raise PackFormatError(f"statistics {self.name}: the tensors ({sorted(self.moments)}) are not the modules "
                                  f"the manifest lists ({sorted(self.entries)})")
        for module, matrix in self.moments.items():
            # (d, d), or (experts, d, d) for the stacked experts of a Mixture-of-Experts layer
            if matrix.ndim not in (2, 3) or matrix.shape[-1] != matrix.shape[-2] or not matrix.is_floating_point():
                raise PackFormatError(f"statistics {self.name}: {module} is not a square floating-point matrix")
            if not torch.isfinite(matrix).all():
                raise PackFormatError(f"statistics {self.name}: {module} holds NaN or infinite values")

    @property
    def content_id(self) -> str:
        parts = [json.dumps(sorted((m, e["key"]) for m, e in self.entries.items())).encode()]
        parts += [self.moments[m].float().contiguous().numpy().tobytes() for m in sorted(self.moments)]
        return content_digest(parts)

    @property
    def requires(self) -> list[dict[str, Any]]:
        return []

    def parts(self) -> dict[str, str]:
        return {m: "×".join(map(str, t.shape)) for m, t in sorted(self.moments.items())}

    def storage_summary(self) -> str:
        return (f"key statistics (second moments) of {len(self.moments)} module(s) over "
                f"{self.provenance.get('tokens', '?'):,} tokens of {self.provenance.get('description', 'text')}")

    def card_context(self) -> dict[str, Any]:
        return {"source": self.provenance, "modules": [(m, e["layer"], tuple(self.moments[m].shape)[-1])
                                                   for m, e in sorted(self.entries.items(), key=lambda x: x[1]["layer"])]}

    # -------------------------------------------------------------------------------------- the model
    def mismatches(self, model, spec: ArchSpec) -> list[str]:
        """The modules whose statistics were made for other weights than ``model``'s (empty when all match)."""
        out = []
        for module, entry in sorted(self.entries.items()):
            layer = entry["layer"]
            if not 0 <= layer < spec.num_layers(model) or spec.mlp_out_name(layer) != module:
                out.append(module)
                continue
            if stats_key(model, spec, layer, self.config())[1] != entry["upstream"]:
                out.append(module)
        return out

    def check_model(self, model, spec: ArchSpec) -> None:
        """Raise :class:`FingerprintMismatchError` unless every module's statistics were made for ``model``."""
        bad = self.mismatches(model, spec)
        if bad:
            raise FingerprintMismatchError(
                f"statistics {self.ref} were computed on {self.base.id} (model_type {self.base.model_type}), and the "
                f"weights that shape the keys of {', '.join(bad)} differ here: they are another model's statistics")

    def config(self) -> StatsConfig:
        """The statistics' settings, as an edit asks for them (their cache keys follow from these): the corpus by
        name and sha256 (the file need not be at hand), or the model's own samples by seed."""
        source = self.provenance
        rule = source.get("rule") or {}
        return StatsConfig(corpus=source.get("corpus"), corpus_sha256=source.get("corpus_sha256"),
                           n_tokens=int(source["n_tokens"]), max_length=int(source["max_length"]),
                           seed=int(source.get("seed", 0)), tolerance=rule.get("tolerance"),
                           check_every=int(rule.get("check_every", 10_000)))

    # -------------------------------------------------------------------------------------- disk
    def payload_manifest(self) -> dict[str, Any]:
        return {"statistics": {"modules": {m: {**e, "dim": int(self.moments[m].shape[-1]),
                                               **({"experts": int(self.moments[m].shape[0])}
                                                  if self.moments[m].ndim == 3 else {})}
                                           for m, e in sorted(self.entries.items())},
                               "source": self.provenance, "content": self.content_id}}

    def write_payload(self, directory: Path) -> None:
        write_safetensors({m: t.float().contiguous() for m, t in self.moments.items()}, directory / STATISTICS)

    @classmethod
    def from_manifest(cls, directory: Path, manifest: dict[str, Any]) -> "StatsPack":
        stats = section(manifest, "statistics", directory)
        modules = stats.get("modules")
        if not isinstance(modules, dict) or not modules:
            raise PackFormatError(f"{directory / MANIFEST}: statistics.modules must list the modules")
        entries = {}
        for module, entry in modules.items():
            if (not isinstance(entry, dict) or not isinstance(entry.get("layer"), int)
                    or not isinstance(entry.get("key"), str) or not isinstance(entry.get("upstream"), str)):
                raise PackFormatError(f"{directory / MANIFEST}: statistics.modules[{module!r}] needs layer, key "
                                      "and upstream")
            entries[module] = {"layer": entry["layer"], "key": entry["key"], "upstream": entry["upstream"]}
        source = stats.get("source")
        if not isinstance(source, dict) or "n_tokens" not in source or "max_length" not in source:
            raise PackFormatError(f"{directory / MANIFEST}: statistics.source must say where the keys came from")
        pack = cls(**cls.header_fields(directory, manifest), moments=read_safetensors(directory / STATISTICS),
                   entries=entries, provenance=source)
        if stats.get("content") != pack.content_id:
            raise PackFormatError(f"{directory}: the statistics' content is not the statistics.content the manifest "
                                  "records")
        return pack


# ---------------------------------------------------------------------------------------------- the store
def store_dir() -> Path:
    """The local cache: statistics directories, found by their modules' keys."""
    return cache_dir("stats")


def _index() -> dict[str, tuple[Path, str]]:
    """``{key: (statistics directory, module)}`` over the store (manifests only; nothing is loaded)."""
    found: dict[str, tuple[Path, str]] = {}
    for folder in sorted(p for p in store_dir().iterdir() if p.is_dir() and (p / MANIFEST).is_file()):
        try:
            manifest = read_manifest(folder)
        except PackFormatError:
            continue
        for module, entry in (manifest.get("statistics") or {}).get("modules", {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                found.setdefault(entry["key"], (folder, module))
    return found


def stored(content: str) -> StatsPack | None:
    """The statistics in the local cache with this content hash, if any."""
    for folder in sorted(p for p in store_dir().iterdir() if p.is_dir() and (p / MANIFEST).is_file()):
        try:
            manifest = read_manifest(folder)
        except PackFormatError:
            continue
        if (manifest.get("statistics") or {}).get("content") == content:
            return load_pack(folder)
    return None


def cached_moments(model, tokenizer, spec: ArchSpec, layers: Sequence[int], config: StatsConfig, *,
                   method: str = "rome") -> dict[int, torch.Tensor]:
    """The key statistics of ``layers`` from the store; those not there are computed together in one pass (under
    file locks) and stored as one statistics directory, so a method that needs five layers pays for one pass."""
    layers = sorted(set(layers))
    keys = {layer: stats_key(model, spec, layer, config) for layer in layers}
    out: dict[int, torch.Tensor] = {}
    with contextlib.ExitStack() as locks:
        for layer in layers:
            locks.enter_context(waiting_lock(store_dir() / f"{keys[layer][0]}",
                                             f"key statistics for {spec.mlp_out_name(layer)}"))
        index = _index()
        loaded: dict[Path, StatsPack] = {}
        missing = []
        for layer in layers:
            hit = index.get(keys[layer][0])
            if hit is None:
                missing.append(layer)
                continue
            folder, module = hit
            pack = loaded.get(folder) or loaded.setdefault(folder, load_pack(folder))
            out[layer] = pack.moments[module]
        if missing:
            log.info("Computing key statistics for %s from %s, once, in one pass: they are kept in %s for every "
                     "later edit.", ", ".join(spec.mlp_out_name(layer) for layer in missing),
                     corpus_description(config), store_dir())
            pack = compute(model, tokenizer, spec, missing, config, method=method)
            save_to_store(pack)
            out.update({pack.entries[m]["layer"]: t for m, t in pack.moments.items()})
    return out


def compute(model, tokenizer, spec: ArchSpec, layers: Iterable[int], config: StatsConfig, *, method: str = "rome",
            name: str | None = None, version: str = "1.0.0") -> StatsPack:
    """Key statistics of ``layers`` as a :class:`StatsPack` (not saved), computed in one pass on the base model
    (applied packs switched off)."""
    layers = sorted(set(layers))
    with adapters_disabled(model):
        moments, count, used = compute_second_moments(model, tokenizer, spec, layers, config)
    entries = {}
    for layer in layers:
        key, upstream = stats_key(model, spec, layer, config)
        entries[spec.mlp_out_name(layer)] = {"layer": layer, "key": key, "upstream": upstream}
    described = describe_base(model, [])
    base = BaseModel(**{**described.to_dict(), "embedding": None,
                        "fingerprint": combine({m: e["upstream"] for m, e in entries.items()})})
    corpus_sha256 = (config.corpus_sha256 or sha256_file(config.corpus)) if config.corpus else None
    source = {"description": corpus_description(config), "corpus": Path(config.corpus).name if config.corpus else None,
              "corpus_sha256": corpus_sha256,
              "seed": config.seed, "n_tokens": config.n_tokens, "max_length": config.max_length, "tokens": count,
              "dtype": "float32", "accumulated": "float64 sums of float32 batch products, divided by the count",
              **used}
    source = {k: v for k, v in source.items() if v is not None}
    return StatsPack(name=name or f"stats-{base.id.replace('/', '-')}-{layers[0]}-{layers[-1]}"[:96],
                     version=version, method=method, hyperparameters={"layers": layers},
                     base=base, moments={spec.mlp_out_name(layer): moments[layer] for layer in layers},
                     entries=entries, provenance=source)


def save_to_store(pack: StatsPack) -> Path:
    """Keep ``pack`` in the local cache (a directory named by its content); returns where."""
    target = store_dir() / f"{pack.name}-{pack.content_id.split(':')[1][:16]}"
    if not (target / MANIFEST).is_file():
        pack.save(target, overwrite=True)
    return target


def install(pack: StatsPack, model=None, spec: ArchSpec | None = None) -> Path:
    """Put a statistics directory (pulled, or named by ``edit --stats``) into the local cache, so later edits find
    it; with ``model``, its fingerprints are checked first (another model's statistics are refused)."""
    if model is not None:
        pack.check_model(model, spec)
    target = store_dir() / f"{pack.name}-{pack.content_id.split(':')[1][:16]}"
    if not (target / MANIFEST).is_file():
        with atomic_directory(target, overwrite=True) as tmp:
            for name in [MANIFEST, *pack.files]:
                shutil.copyfile(Path(pack.path) / name, tmp / name)
    return target


def listing() -> list[dict[str, Any]]:
    """What the local cache holds: each statistics directory's reference, model, modules, source and tokens."""
    rows = []
    for folder in sorted(p for p in store_dir().iterdir() if p.is_dir() and (p / MANIFEST).is_file()):
        try:
            manifest = read_manifest(folder)
        except PackFormatError:
            continue
        stats = manifest.get("statistics") or {}
        source = stats.get("source") or {}
        rows.append({"ref": f"{manifest['name']}@{manifest['version']}", "model": manifest["base_model"].get("id"),
                     "modules": sorted(stats.get("modules") or {}), "source": source.get("description"),
                     "tokens": source.get("tokens", 0), "folder": folder.name})
    return rows
