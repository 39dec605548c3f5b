"""A change of the residual stream written as a change of an MLP's output that reaches the stream through a norm.

Gemma 2/3, OLMo 2, EXAONE 4 and GLM-4 normalise the MLP's output before adding it to the residual stream (the
architecture file's ``mlp_out_norm``). The output there is small (Gemma 3 270M: an RMS of about 0.2 at the
down projection against 4-65 after the norm), so a residual change written into it unchanged is dozens of times
too large, and the norm then makes every token's MLP output point the same way.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def through(norm: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """``norm(rows)`` in float32 on ``rows``' device, run in the norm's own dtype and device."""
    weight = next(norm.parameters(), None)
    dtype = weight.dtype if weight is not None else rows.dtype
    device = weight.device if weight is not None else rows.device
    return norm(rows.to(device, dtype)).float().to(rows.device)


@torch.no_grad()
def through_norm(norm: torch.nn.Module, outputs: torch.Tensor, wanted: torch.Tensor, *,
                 name: str = "norm") -> torch.Tensor:
    """The change of ``outputs`` (rows ``y``: the MLP's output that ``norm`` reads) that moves ``norm(y)`` by
    ``wanted`` as nearly as the norm allows.

    For an RMS norm ``N(y) = g ⊙ y / rms(y)`` only the direction of ``y`` matters, so the target
    ``t = N(y) + wanted`` is reached in direction: ``y' ∝ t / g``, at the multiple of that direction nearest ``y``
    (the smallest change, so the smallest weight update), and at least half ``y``'s size. Its length is the
    norm's to set: the part of ``wanted`` that would rescale ``N(y)`` is not reached, and MEMIT's later layers,
    which measure what is left, take it up. A norm whose output changes with the scale of its input (a LayerNorm
    with a bias) is refused.
    """
    y = outputs.float()
    base = through(norm, y)
    unit = y / _rms(y).clamp_min(1e-30)  # unit RMS: the norm's ε does not count
    once = through(norm, unit)
    if not torch.allclose(through(norm, 2 * unit), once, rtol=1e-2, atol=1e-3 * float(once.abs().max()) + 1e-6):
        raise ValueError(f"{name}: an architecture's mlp_out_norm must be an RMS norm (its output independent of "
                         "its input's scale); this one is not")
    gain = through(norm, torch.ones(1, y.shape[1], device=y.device))[0]
    tiny = 1e-6 * float(gain.abs().max())
    gain = torch.where(gain.abs() < tiny, torch.full_like(gain, tiny), gain)
    direction = (base + wanted.float()) / gain
    nearest = (direction * y).sum(1, keepdim=True) / direction.pow(2).sum(1, keepdim=True).clamp_min(1e-30)
    same_size = _rms(y) / _rms(direction).clamp_min(1e-30)
    # At least half y's size: a near-orthogonal target would otherwise give an output so small that the norm's ε
    # counts, and a change a later token's key could flip.
    scale = torch.maximum(nearest, 0.5 * same_size)
    return (scale * direction - y).to(wanted.dtype)


def _rms(rows: torch.Tensor) -> torch.Tensor:
    return rows.pow(2).mean(1, keepdim=True).sqrt()
