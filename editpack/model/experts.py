"""Stacked Mixture-of-Experts parameters (transformers' experts modules), read the way the module computes:
the experts module of a layer, one expert's output-projection input for given block inputs, and its output
projection as an ``(out, in)`` view. Used by the key statistics (per expert) and by the methods that edit experts
(:mod:`editpack.methods.locate.experts`)."""

from __future__ import annotations

import torch

from ..errors import UnknownArchitectureError
from .arch import ArchSpec, get_module
from .fingerprint import edited_layer


def experts_module(model, spec: ArchSpec, layer: int) -> torch.nn.Module:
    """``layer``'s experts module (under a PEFT wrapper, the wrapped module), with a clear error where the layer
    is dense (DeepSeek-style first layers, Qwen3-MoE's ``mlp_only_layers``)."""
    get_module(model, spec.experts_name(layer))  # a clear error where the module is missing
    try:
        module = edited_layer(model, spec.mlp_out_name(layer))[0]  # the owner of down_proj, through PEFT's wrappers
    except AttributeError:
        module = None
    if not isinstance(getattr(module, "down_proj", None), torch.Tensor) or module.down_proj.dim() != 3:
        raise UnknownArchitectureError(f"{spec.experts_name(layer)} holds no stacked experts (down_proj of "
                                       "(experts, …) shape): this layer is dense; edit another layer")
    return module


@torch.no_grad()
def expert_inputs(experts: torch.nn.Module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """``(n, intermediate)`` float32: expert ``expert``'s output-projection input for block inputs ``hidden``
    ``(n, hidden)``, as the experts module computes it (whether or not the router sends them there)."""
    gated = bool(getattr(experts, "has_gate", True))
    weight = (experts.gate_up_proj if gated else experts.up_proj)[expert]
    x = hidden.to(device=weight.device, dtype=weight.dtype)
    out = x @ weight if getattr(experts, "is_transposed", False) else x @ weight.T
    if getattr(experts, "has_bias", False):
        out = out + (experts.gate_up_proj_bias if gated else experts.up_proj_bias)[expert]
    return (experts._apply_gate(out) if gated else experts.act_fn(out)).float()


def down_weight(experts: torch.nn.Module, expert: int) -> torch.Tensor:
    """Expert ``expert``'s output projection as an ``(out, in)`` view."""
    weight = experts.down_proj[expert]
    return weight.T if getattr(experts, "is_transposed", False) else weight
