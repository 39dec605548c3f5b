"""The one small interface every edit method implements, and the registry that names them.

A method is a class with a ``name``, a ``config_class`` (a dataclass of hyper-parameters with defaults) and
``compute(model, tokenizer, facts, spec, state=None)`` returning a :class:`~editpack.methods.delta.WeightDelta`. ``compute``
must leave the model's weights exactly as it found them: the caller decides whether to apply the result.
Register with ``@register_method``; look up with :func:`get_method`. Nothing switches on method names.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

import torch

from ..arch import ArchSpec
from ..errors import UnknownMethodError
from ..facts import Fact
from .delta import WeightDelta


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's hyper-parameters (a dataclass; JSON-serialisable values only)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown hyper-parameter(s) for {cls.__name__}: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(fields))})")
        return cls(**values)


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", …]`` (the CLI's ``--set``) as hyper-parameters: each value JSON when it parses, else text."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


class EditMethod(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()

    @abstractmethod
    def compute(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec,
                state: dict[str, torch.Tensor] | None = None) -> WeightDelta:
        """Compute the weight delta that makes ``model`` believe ``facts``; leave ``model`` unchanged.

        ``state`` is what this method returned in ``WeightDelta.state`` for the pack being extended (sequential
        editing), or ``None``.
        """


REGISTRY: dict[str, type[EditMethod]] = {}


def register_method(cls: type[EditMethod]) -> type[EditMethod]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"edit method {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[EditMethod]:
    if name not in REGISTRY:
        raise UnknownMethodError(f"unknown edit method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
