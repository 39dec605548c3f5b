"""The one small interface every edit method implements, and the registry that names them.

A method is a class with a ``name``, a ``config_class`` (a dataclass of hyper-parameters with defaults), a
``layer_role`` (where it edits by default: ``critical`` or ``run``, placed by each architecture file) and
``compute(model, tokenizer, facts, spec, state=None)`` returning a :class:`~editpack.packs.delta.WeightDelta`.
``compute`` must leave the model's weights exactly as it found them: the caller decides whether to apply the
result. A method that makes another kind of artifact than a weight delta (a memory) overrides
:meth:`EditMethod.build_pack`. Register with ``@register_method``; look up with :func:`get_method`.
Nothing switches on method names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Sequence

import torch

from ..errors import UnknownArchitectureError, UnknownMethodError
from ..facts import Fact
from ..model.arch import ArchSpec
from ..packs.base_model import describe_base
from ..packs.delta import WeightDelta
from ..packs.weights import EditPack

#: A value's range check: ``None`` when the value is acceptable, else what it must be ("must be at least 1").
Check = Callable[[Any], "str | None"]


def at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"must be at least {low}"


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def between(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Check:
    """``low ≤ value ≤ high`` (an open end excludes it)."""
    def check(value: Any) -> str | None:
        ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
        return None if ok else f"must be in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return check


def one_of(*choices: Any) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(map(str, choices))}"


def each(check: Check, what: str = "each value") -> Check:
    """``check`` on every item of a list."""
    def run(values: Any) -> str | None:
        for item in values:
            problem = check(item)
            if problem:
                return f"{what} {problem} ({item!r} is not)"
        return None
    return run


def non_empty(values: Any) -> str | None:
    return None if len(values) else "must not be empty"


#: Layer indices: a non-empty list of indices from 0 (the model's depth is checked when the model is there).
LAYERS: tuple[Check, ...] = (non_empty, each(at_least(0), "each layer index"))


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's hyper-parameters (a dataclass; JSON-serialisable values only).

    ``bounds`` names the range each setting must be in (checks of this module: :func:`at_least`, :func:`between`,
    :func:`one_of`, …); a subclass adds its own, and they apply with its parents' (a setting whose default a
    subclass changes keeps its range). Every number must also be finite. Ranges are checked with the types by
    :meth:`from_dict`, before any model is loaded.
    """

    bounds: ClassVar[dict[str, tuple[Check, ...]]] = {"layers": LAYERS}

    @classmethod
    def all_bounds(cls) -> dict[str, tuple[Check, ...]]:
        out: dict[str, tuple[Check, ...]] = {}
        for klass in reversed(cls.__mro__):
            out.update(klass.__dict__.get("bounds", {}))
        return out

    def check_ranges(self) -> None:
        """Raise ``ValueError`` naming the first setting out of its range (``bounds``) or not finite."""
        bounds = self.all_bounds()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if _non_finite(value):
                raise ValueError(f"hyper-parameter {f.name} must be a finite number, not {value!r}")
            for check in bounds.get(f.name, ()):
                problem = check(value)
                if problem:
                    raise ValueError(f"hyper-parameter {f.name} {problem}, not {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def recorded(self) -> dict[str, Any]:
        """The values as a pack's manifest records them: portable (a config holding a local path records only
        what identifies the file elsewhere)."""
        return self.to_dict()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        """A config from ``values``: unknown names and values of the wrong type are errors naming the setting."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown hyper-parameter(s) for {cls.__name__}: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(fields))})")
        hints = typing.get_type_hints(cls)
        checked = {}
        for key, value in values.items():
            ok, value = _conforms(value, hints[key])
            if not ok:
                raise ValueError(f"hyper-parameter {key} must be {_describe(hints[key])}, not {values[key]!r}")
            checked[key] = value
        config = cls(**checked)
        config.check_ranges()
        config.validate()
        return config

    def validate(self) -> None:
        """Check relations between values (a method's config overrides this); raise ``ValueError``."""


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def _conforms(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits the type ``hint`` (JSON-like types only), and the value (an int for a float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _conforms(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (item,) = typing.get_args(hint) or (Any,)
        out = []
        for element in value:
            ok, converted = _conforms(element, item)
            if not ok:
                return False, value
            out.append(converted)
        return True, out
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    return True, value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {_describe(item).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(hint, str(hint))


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", …]`` (the CLI's ``--set``) as hyper-parameters: each value JSON when it parses, else text."""
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
    #: The layer role the method edits when ``layers`` is not given (see ``editpack.model.arch``).
    layer_role: ClassVar[str] = "critical"
    #: One line for ``--help`` and the methods table.
    summary: ClassVar[str] = ""
    #: Its packs route prompts by their plain text (memory packs), so it edits no chat form (``editpack.chat``).
    routes_text: ClassVar[bool] = False
    #: It learns something before it edits (MEND's editor): it implements ``learner`` and ``editor_from``, and
    #: ``editpack train`` offers it.
    trainable: ClassVar[bool] = False
    #: Why the method is experimental, as measured on the built-in models (``None``: it is not): ``--help``, the
    #: card of every pack it makes and the docs say so.
    experimental: ClassVar[str | None] = None
    #: Settings that edit :func:`editpack.testing.tiny_model` in a few steps: the test battery and the installed
    #: wheel's smoke check edit with every registered method so (:func:`editpack.testing.tiny_edit_settings`).
    tiny_settings: ClassVar[dict[str, Any]] = {}
    #: How many of :func:`editpack.testing.tiny_facts` a tiny edit takes (a method that normalises over a batch
    #: needs several).
    tiny_fact_count: ClassVar[int] = 1
    #: A trainable method's settings for a few training steps on the tiny model; the edit then takes the result
    #: as ``editor``.
    tiny_training: ClassVar[dict[str, Any]] = {}
    #: Packages the method needs besides editpack's dependencies (import names; the memory packs' encoder).
    needs_packages: ClassVar[tuple[str, ...]] = ()
    #: It edits Mixture-of-Experts blocks (docs/concepts/moe.md); others are refused on such a family.
    edits_experts: ClassVar[bool] = False

    @classmethod
    def takes(cls, setting: str) -> bool:
        """Whether the method's config has ``setting`` (a key-statistics corpus goes only to methods that take
        ``stats_corpus``)."""
        return setting in {f.name for f in dataclasses.fields(cls.config_class)}

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()

    @abstractmethod
    def compute(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec,
                state: dict[str, torch.Tensor] | None = None) -> WeightDelta:
        """Compute the weight delta that makes ``model`` believe ``facts``; leave ``model`` unchanged.

        ``state`` is what this method returned in ``WeightDelta.state`` for the pack being extended (sequential
        editing), or ``None``.
        """
    def default_layers(self, model, spec: ArchSpec) -> list[int]:
        """The layers this method edits on ``model`` when none are given: its role, placed by ``spec``."""
        return spec.role_layers(self.layer_role, model)

    def resolve_layers(self, model, spec: ArchSpec) -> list[int]:
        """``config.layers``, filled in from :meth:`default_layers` when unset and checked against the model's
        depth; the resolved list is what the pack records."""
        cfg = self.config
        if spec.experts and not self.edits_experts:
            able = ", ".join(sorted(name for name, cls in REGISTRY.items() if cls.edits_experts))
            raise UnknownArchitectureError(f"{self.name} does not edit Mixture-of-Experts models such as this "
                                           f"{spec.family} model; {able} do")
        if cfg.layers is None:
            cfg.layers = self.default_layers(model, spec)
        depth = spec.num_layers(model)
        bad = [layer for layer in cfg.layers if not 0 <= layer < depth]
        if bad:
            raise ValueError(f"{self.name} layers {bad} are outside 0..{depth - 1} for this {spec.family} model")
        return cfg.layers

    def build_pack(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec, *, name: str, version: str,
                   parents: list[dict[str, Any]], state: dict[str, torch.Tensor] | None = None,
                   previous=None):
        """The artifact this method makes: by default a weight pack around :meth:`compute`'s delta.

        ``previous``: the pack being grown, for methods whose artifact grows by itself (a codebook's entries);
        weight packs are combined by :func:`editpack.extend` and receive ``state`` instead."""
        delta = self.compute(model, tokenizer, facts, spec, state=state)
        return EditPack(name=name, version=version, method=self.name, hyperparameters=self.config.recorded(),
                        facts=list(facts), base=describe_base(model, delta.modules), delta=delta,
                        fan_in_fan_out=spec.mlp_transposed, parents=parents)


REGISTRY: dict[str, type[EditMethod]] = {}


def register_method(cls: type[EditMethod]) -> type[EditMethod]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"edit method {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def trainable_methods() -> list[str]:
    """The registered methods that learn before they edit (:attr:`EditMethod.trainable`), by name."""
    return sorted(name for name, cls in REGISTRY.items() if cls.trainable)


def get_method(name: str) -> type[EditMethod]:
    if name not in REGISTRY:
        raise UnknownMethodError(f"unknown edit method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
