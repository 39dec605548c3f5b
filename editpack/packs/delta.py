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


@dataclass
class ExpertsDelta(LowRankDelta):
    """A delta of a stacked experts parameter (Mixture-of-Experts ``down_proj``): expert ``e`` changes by
    ``Bₑ @ Aₑ`` (``(out, in)``, rank ``r`` each), held in the layout of PEFT's LoRA on a parameter
    (``target_parameters``): ``A`` is ``(r·E, in)`` with expert ``e``'s rows at ``e·r … e·r + r - 1``, and ``B`` is
    ``(out, r·E)`` with expert ``e``'s ``j``-th column at ``j·E + e``. An expert no fact reaches has zero factors.
    """

    experts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.experts < 1 or self.A.shape[0] % self.experts:
            raise ValueError(f"stacked factors of {self.A.shape[0]} rows do not split over {self.experts} experts")

    @property
    def rank(self) -> int:
        return self.A.shape[0] // self.experts

    def per_expert(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` as ``(E, out, r)`` and ``(E, r, in)``."""
        a = self.A.reshape(self.experts, self.rank, self.A.shape[1])
        b = self.B.reshape(self.B.shape[0], self.rank, self.experts).permute(2, 0, 1)
        return b, a

    def dense(self) -> torch.Tensor:
        """``(E, out, in)``: every expert's update."""
        b, a = self.per_expert()
        return b @ a

    def norm(self) -> float:
        b, a = (t.detach().double() for t in self.per_expert())
        return float(((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum().clamp_min(0).sqrt())

    def edited(self) -> list[int]:
        """The experts whose factors are not all zero."""
        b, a = self.per_expert()
        return [e for e in range(self.experts) if bool(b[e].any()) and bool(a[e].any())]

    @classmethod
    def from_experts(cls, factors: dict[int, LowRankDelta], experts: int, out: int, inner: int,
                     rank: int | None = None) -> "ExpertsDelta":
        """Per-expert factors stacked (ranks padded with zeros to ``rank``, by default the largest)."""
        rank = max([rank or 0] + [d.rank for d in factors.values()]) or 1
        ref = next(iter(factors.values())).A if factors else torch.zeros(1)
        a = torch.zeros(experts, rank, inner, dtype=ref.dtype, device=ref.device)
        b = torch.zeros(experts, out, rank, dtype=ref.dtype, device=ref.device)
        for e, d in factors.items():
            a[e, : d.rank] = d.A
            b[e, :, : d.rank] = d.B
        return cls(B=b.permute(1, 2, 0).reshape(out, rank * experts), A=a.reshape(experts * rank, inner),
                   experts=experts)

    def padded(self, rank: int) -> "ExpertsDelta":
        """The same delta with each expert's rank padded to ``rank`` (zero factors)."""
        if rank == self.rank:
            return self
        b, a = self.per_expert()
        return ExpertsDelta.from_experts({e: LowRankDelta(B=b[e], A=a[e]) for e in range(self.experts)},
                                         self.experts, b.shape[1], a.shape[2], rank)

    def concat(self, other: "LowRankDelta") -> "ExpertsDelta":
        if not isinstance(other, ExpertsDelta) or other.experts != self.experts:
            raise ValueError("an experts delta concatenates only with another of the same experts")
        (b1, a1), (b2, a2) = self.per_expert(), other.per_expert()
        return ExpertsDelta.from_experts(
            {e: LowRankDelta(B=torch.cat([b1[e], b2[e]], dim=1), A=torch.cat([a1[e], a2[e]])) for e in
             range(self.experts)}, self.experts, b1.shape[1], a1.shape[2])
