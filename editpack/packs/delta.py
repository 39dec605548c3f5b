"""Weight deltas as the methods produce them: per-module low-rank factors in ``(out, in)`` convention."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LowRankDelta:
    """``ΔW = B @ A`` with ``B`` of shape ``(out, r)`` and ``A`` of shape ``(r, in)``, in float32.

    ``ΔW`` is in ``(out_features, in_features)`` orientation for every layer type; GPT-2's transposed Conv1D is
    handled where the delta is applied (PEFT's ``fan_in_fan_out``).
    """

    B: torch.Tensor
    A: torch.Tensor

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"low-rank factors do not chain: B {tuple(self.B.shape)}, A {tuple(self.A.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def norm(self) -> float:
        """The Frobenius norm of ``B @ A``, without forming it: √(Σ (BᵀB) ⊙ (AAᵀ)), in float64 (no overflow)."""
        b, a = self.B.detach().double(), self.A.detach().double()
        return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())

    @classmethod
    def from_dense(cls, update: torch.Tensor) -> "LowRankDelta":
        """A dense ``(out, in)`` matrix as exact factors: an identity on the smaller side (rank min(out, in))."""
        rows, cols = update.shape
        if rows <= cols:
            return cls(B=torch.eye(rows, device=update.device, dtype=update.dtype), A=update)
        return cls(B=update, A=torch.eye(cols, device=update.device, dtype=update.dtype))

    def concat(self, other: "LowRankDelta") -> "LowRankDelta":
        """The delta equal to ``self + other`` exactly (factors stacked, ranks add)."""
        return LowRankDelta(torch.cat([self.B, other.B], dim=1), torch.cat([self.A, other.A], dim=0))


@dataclass
class WeightDelta:
    """A method's result: one :class:`LowRankDelta` per edited module (full module names).

    ``state`` holds tensors a method needs in a later round of sequential editing (AlphaEdit's earlier keys);
    a pack stores it beside the adapter and hands it back to the method when the pack is extended.
    """

    modules: dict[str, LowRankDelta] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, module: str, delta: LowRankDelta) -> None:
        self.modules[module] = self.modules[module].concat(delta) if module in self.modules else delta
