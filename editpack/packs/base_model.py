"""The model an artifact was computed on, as its manifest records it (``base_model``): portable names and the
fingerprints and norms of the weights it edits, never a local path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import PackFormatError
from ..model.arch import spec_for
from ..model.builtins import BUILTINS
from ..model.fingerprint import combine, materialized, memo_fingerprint, module_fingerprints, unwrap, weight_norms
from ..model.loading import ModelRef


# ---------------------------------------------------------------------------------------------- base model
@dataclass
class BaseModel:
    """The model an artifact was computed on. Every field is portable: no local path is ever recorded."""

    id: str  # a built-in name, a Hub id, or the name (not the path) of a local folder or GGUF file
    fingerprint: str
    model_type: str
    revision: str | None = None
    hub_id: str | None = None  # the upstream Hub repository (the card's ``base_model``; PEFT's base name)
    modules: dict[str, str] | None = None  # per-module fingerprints; ``fingerprint`` combines them
    embedding: str | None = None  # fingerprint of the input embedding: the identity check for quantized models
    norms: dict[str, float] | None = None  # Frobenius norm of each edited module's original weight (the delta's scale)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "BaseModel":
        if not isinstance(data, dict):
            raise PackFormatError(f"{where}: base_model must be an object")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}  # ``path`` of format-1 packs before 0.4 is dropped
        for key in ("id", "model_type"):
            if not isinstance(values.get(key), str):
                raise PackFormatError(f"{where}: base_model.{key} is missing or not text")
        values.setdefault("fingerprint", "")
        modules = values.get("modules")
        if modules is not None:
            if not isinstance(modules, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in modules.items()):
                raise PackFormatError(f"{where}: base_model.modules must map module names to fingerprints")

            if modules and values["fingerprint"] != combine(modules):
                raise PackFormatError(
                    f"{where}: base_model.fingerprint {str(values['fingerprint'])[:23]}… is not the combination of "
                    f"its module fingerprints ({combine(modules)[:23]}…): the manifest was altered")
        norms = values.get("norms")
        if norms is not None and (not isinstance(norms, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")
                for k, v in norms.items())):
            raise PackFormatError(f"{where}: base_model.norms must map module names to positive finite numbers")
        return cls(**values)

    @property
    def peft_name(self) -> str:
        """What PEFT's ``base_model_name_or_path`` says: the Hub id where there is one, else the portable id."""
        return self.hub_id or self.id


def describe_base(model, modules: Iterable[str]) -> BaseModel:
    """What an artifact records about the model it was computed on (original weights, before any pack)."""
    model = unwrap(model)
    ref: ModelRef | None = getattr(model, "editpack_ref", None)
    model_id = ref.id if ref else portable_id(getattr(model, "name_or_path", "") or "unknown")
    builtin = BUILTINS.get(model_id)
    hub_id = builtin.hub_id if builtin else (model_id if ref and ref.hub else None)
    modules = list(modules)
    fingerprints = module_fingerprints(model, modules) if modules else {}
    norms = weight_norms(model, modules)
    embed_name = spec_for(model).embed
    with materialized(model.get_submodule(embed_name)) as embed:
        embedding = memo_fingerprint(model, f"{embed_name}.weight", embed.weight)
    return BaseModel(
        id=model_id,
        fingerprint=combine(fingerprints) if fingerprints else "",
        modules=fingerprints or None,
        embedding=embedding,
        norms=norms or None,
        model_type=model.config.model_type,
        revision=ref.revision if ref else None,
        hub_id=hub_id,
    )


def portable_id(name: str) -> str:
    """A model name fit to record: a Hub id as is; of a local path only its last component."""
    text = str(name)
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not Path(text).exists():
        return text
    return Path(text).name or "unknown"
