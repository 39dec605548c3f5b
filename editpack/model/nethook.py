"""A small tracing helper in the spirit of ROME's ``nethook``: read and patch module inputs and outputs by name.

    with Trace(model, "model.layers.5.mlp.down_proj", retain_input=True) as tr:
        model(**batch)
    keys = tr.input            # what down_proj received

    with TraceDict(model, [a, b], edit_output=fn) as td:   # fn(output, layer_name) -> new output
        model(**batch)

``stop=True`` raises :class:`StopForward` right after the (last) traced module ran, and the context manager
swallows it, so reading an early layer does not pay for the rest of the network. Hooks are always removed on
exit, also on error.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch

from .arch import get_module

EditFn = Callable[[Any, str], Any]


class StopForward(Exception):
    """Raised inside a forward pass to end it early; caught by :class:`Trace` / :class:`TraceDict`."""


def first_tensor(value: Any) -> torch.Tensor:
    """A module's output tensor: the value itself, or the first element of a tuple/list output."""
    return value[0] if isinstance(value, (tuple, list)) else value


def replace_first(output: Any, value: torch.Tensor) -> Any:
    """``output`` with its tensor replaced by ``value``, in the same container (tuple, list or none)."""
    if isinstance(output, tuple):
        return (value,) + output[1:]
    if isinstance(output, list):
        return [value] + output[1:]
    return value


class Trace(contextlib.AbstractContextManager):
    """Hook one module. Attributes ``input`` / ``output`` hold what was retained (first tensor of a tuple)."""

    def __init__(
        self,
        model: torch.nn.Module,
        layer: str,
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        clone: bool = False,
        detach: bool = False,
        edit_input: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
        edit_output: EditFn | None = None,
        stop: bool = False,
        retain_args: bool = False,
    ) -> None:
        self.layer = layer
        self.input: torch.Tensor | None = None
        #: With ``retain_args``: every argument the module was called with, positional then keyword, in order.
        self.args: tuple = ()
        self.output: Any = None
        module = get_module(model, layer)

        def keep(value: Any) -> Any:
            if detach:
                value = value.detach() if isinstance(value, torch.Tensor) else value
            if clone:
                value = value.clone() if isinstance(value, torch.Tensor) else value
            return value

        def pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict):
            if not args:
                return None
            first = args[0]
            if edit_input is not None:
                first = edit_input(first, layer)
                args = (first, *args[1:])
            if retain_input:
                self.input = keep(first)
            if retain_args:
                self.args = tuple(keep(a) for a in (*args, *kwargs.values()))
            return (args, kwargs) if edit_input is not None else None

        def post_hook(_module: torch.nn.Module, _args: tuple, output: Any):
            if edit_output is not None:
                output = edit_output(output, layer)
            if retain_output:
                self.output = keep(first_tensor(output)) if isinstance(output, (tuple, list)) else keep(output)
            if stop:
                raise StopForward()
            return output

        self._handles = [
            module.register_forward_pre_hook(pre_hook, with_kwargs=True),
            module.register_forward_hook(post_hook),
        ]

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class TraceDict(OrderedDict, contextlib.AbstractContextManager):
    """Hook several modules at once; ``td[name]`` is that module's :class:`Trace`.

    With ``stop=True`` the forward pass ends after the last of ``layers`` (in the order given) has run.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        clone: bool = False,
        detach: bool = False,
        edit_input: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
        edit_output: EditFn | None = None,
        stop: bool = False,
        retain_args: bool = False,
    ) -> None:
        super().__init__()
        layers = list(dict.fromkeys(layers))
        try:
            for index, layer in enumerate(layers):
                self[layer] = Trace(
                    model,
                    layer,
                    retain_input=retain_input,
                    retain_output=retain_output,
                    clone=clone,
                    detach=detach,
                    edit_input=edit_input,
                    edit_output=edit_output,
                    stop=stop and index == len(layers) - 1,
                    retain_args=retain_args,
                )
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def close(self) -> None:
        for trace in self.values():
            trace.close()
