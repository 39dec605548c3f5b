"""Architecture specs: where a model family keeps its blocks, MLPs, norms and head, as data.

Each family is one JSON file in the ``editpack.adapters`` package data (the repository's ``adapters/`` folder).
A spec is chosen by the model config's ``model_type``; nothing here tests model names. Module paths are
templates in which ``{}`` stands for the layer index. ``layer_roles`` says where the layers that methods edit
lie: each method declares a role (``critical``: the layer(s) a single-layer method such as ROME edits; ``run``:
the run of consecutive layers MEMIT-style methods spread an update over; ``late``: the one layer a codebook
wraps (GRACE); ``tail``: the last MLPs a gradient-based lifelong method edits (UltraEdit)), and the file places each
role as integers (a layer index) or floats in ``(0, 1)`` (a fraction of the model's depth, rounded down), so one
file serves every size of a family. ``method_settings`` holds a family's hyper-parameter defaults for a method.

Adding a family means adding ``adapters/<family>.json``; see ``docs/architectures.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import torch

from ..errors import UnknownArchitectureError

_REQUIRED = ("family", "model_types", "blocks", "mlp", "mlp_in", "mlp_out", "final_norm", "lm_head", "embed")


@dataclass(frozen=True)
class ArchSpec:
    """The module layout of one model family (see the module docstring)."""

    family: str
    model_types: tuple[str, ...]
    blocks: str
    mlp: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    final_norm: str
    lm_head: str
    embed: str
    attn: str | None = None
    mlp_transposed: bool = False
    description: str = ""
    layer_roles: dict[str, dict[str, Any]] = field(default_factory=dict)
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: How llama.cpp names this family (``arch``, its ``general.architecture``) and which modules its converter
    #: copies without transforming them (``plain_modules``, suffixes after the layer): only those can be exported
    #: as GGUF LoRA tensors. Absent: no GGUF export.
    gguf: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "ArchSpec":
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise ValueError(f"architecture spec {source} lacks required keys: {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"architecture spec {source} has unknown keys: {', '.join(unknown)}")
        values = dict(data)
        values["model_types"] = tuple(values["model_types"])
        values["mlp_in"] = tuple(values["mlp_in"]) if isinstance(values["mlp_in"], list) else (values["mlp_in"],)
        return cls(**values)

    # -- module paths ---------------------------------------------------------------------------------------
    def block_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def mlp_name(self, layer: int) -> str:
        return self.mlp.format(layer)

    def mlp_out_name(self, layer: int) -> str:
        return self.mlp_out.format(layer)

    def mlp_in_names(self, layer: int) -> list[str]:
        return [template.format(layer) for template in self.mlp_in]

    def block_of(self, name: str) -> int | None:
        """Index of the decoder block that module ``name`` lies in (``None`` if it is outside the blocks)."""
        prefix = f"{self.blocks}."
        if not name.startswith(prefix):
            return None
        index = name[len(prefix):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    # -- sizes and defaults ---------------------------------------------------------------------------------
    def num_layers(self, model: torch.nn.Module) -> int:
        return len(get_module(model, self.blocks))

    def role_layers(self, role: str, model: torch.nn.Module) -> list[int]:
        """The layers of ``role`` (``critical``, ``run``, …) on ``model``, resolving depth fractions."""
        entry = self.layer_roles.get(role)
        if entry is None or ("layers" not in entry and "start" not in entry):
            raise UnknownArchitectureError(
                f"the {self.family} spec does not place layer role {role!r}; pass layers=... or add "
                f'"layer_roles": {{"{role}": {{"layers": [...]}}}} to adapters/{self.family}.json'
            )
        depth = self.num_layers(model)
        if "start" in entry:  # a run of consecutive layers from a depth fraction (or index)
            start = entry["start"]
            first = int(start * depth) if isinstance(start, float) else int(start)
            first = min(first, max(depth - int(entry["count"]), 0))
            return list(range(first, min(first + int(entry["count"]), depth)))
        layers = []
        for value in entry["layers"]:
            index = int(value * depth) if isinstance(value, float) else int(value)
            if not 0 <= index < depth:
                raise ValueError(f"layer {value!r} of role {role!r} is outside 0..{depth - 1}")
            layers.append(index)
        return layers

    def method_defaults(self, method: str) -> dict[str, Any]:
        """Hyper-parameter defaults this family gives ``method`` (e.g. MEMIT's λ for Llama-like models)."""
        return dict(self.method_settings.get(method) or {})

    def weight_matrix(self, module: torch.nn.Module) -> torch.Tensor:
        """The module's weight as a ``(out_features, in_features)`` view (un-transposing GPT-2's Conv1D)."""
        weight = module.weight
        return weight.T if self.mlp_transposed else weight


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Return the submodule called ``name`` (dotted path), with an error that lists what exists nearby."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise UnknownArchitectureError(f"model {type(model).__name__} has no module {name!r}: {exc}") from None


@lru_cache(maxsize=None)
def _load_all() -> dict[str, ArchSpec]:
    by_type: dict[str, ArchSpec] = {}
    for entry in sorted(resources.files("editpack.adapters").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        spec = ArchSpec.from_dict(json.loads(entry.read_text(encoding="utf-8")), source=entry.name)
        for model_type in spec.model_types:
            if model_type in by_type:
                raise ValueError(f"model_type {model_type!r} is claimed by two specs: {by_type[model_type].family}, {spec.family}")
            by_type[model_type] = spec
    return by_type



def spec_for_model_type(model_type: str) -> ArchSpec:
    specs = _load_all()
    if model_type not in specs:
        raise UnknownArchitectureError(
            f"no architecture spec for model_type {model_type!r} (known: {', '.join(sorted(specs))}). Describe it in "
            f"a new file adapters/<family>.json listing \"{model_type}\" under model_types; see docs/architectures.md"
        )
    return specs[model_type]


def spec_for(model: torch.nn.Module) -> ArchSpec:
    """The spec for a transformers model (or a PEFT model wrapping one), chosen by ``config.model_type``."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnknownArchitectureError(f"{type(model).__name__} has no config; editpack needs a transformers model")
    return spec_for_model_type(config.model_type)
