"""Packs applied by wrapping a layer (codebooks, side memories): where the forward hook goes and what it shares.

A hook-applied pack never changes a weight: :func:`editpack.apply` registers its :class:`LayerHook` on the layer
(:func:`hook_target`), ``set_enabled`` flips :attr:`LayerHook.enabled`, and ``remove`` / ``revert`` take the hook
off, which restores the model exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import PackFormatError
from .fingerprint import base_layer, unwrap
from .nethook import first_tensor, replace_first


def hook_target(model: torch.nn.Module, name: str, ref: str) -> torch.nn.Module:
    """The layer a pack's forward hook goes on: ``name`` in the transformers model under any wrapper, looking
    through a PEFT LoRA layer to the layer itself (adapters added or unloaded later leave the hook in place; a
    LoRA on the same module then adds its change to what the hook returns)."""
    try:
        module = unwrap(model).get_submodule(name)
    except AttributeError as exc:
        raise PackFormatError(f"{ref} wraps {name}, which this model does not have") from exc
    return base_layer(module)


class LayerHook:
    """A forward hook on one layer that :meth:`change` s its output; off while ``enabled`` is false."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.enabled = True
        self._tensors: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}
        self.handle = module.register_forward_hook(self)

    def remove(self) -> None:
        self.handle.remove()
        self._tensors.clear()

    def on(self, device: torch.device, dtype: torch.dtype, make) -> tuple[torch.Tensor, ...]:
        """The hook's tensors on ``device`` in ``dtype``, moved once per device and dtype (not per call)."""
        if (device, dtype) not in self._tensors:
            self._tensors[(device, dtype)] = make(device, dtype)
        return self._tensors[(device, dtype)]

    def change(self, inputs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
        """The layer's new output from its input and output (``None``: unchanged)."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, module, args, output: Any):
        if not self.enabled or not args:
            return None
        replaced = self.change(args[0], first_tensor(output))
        return None if replaced is None else replace_first(output, replaced)
