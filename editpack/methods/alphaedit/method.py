"""AlphaEdit (Fang et al. 2025): null-space-constrained MEMIT for sequential editing.

With P the projector onto the eigen-directions of the preserved keys' second moment C whose eigenvalue is
below ``nullspace_threshold`` (so ΔW P leaves preserved keys' outputs alone), K the new keys and K_p the keys of
every earlier round (kept in the pack as state), each layer's update is

    ΔW = R · [ (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K ]ᵀ

stored as the factors ``B = R`` and ``A = [(P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K]ᵀ`` (rank ≤ n). After a round the keys
are read again on the edited model and appended to the state (``keys.<module>``, one row per fact), which
``editpack edit --onto`` / :func:`editpack.extend` hand to the next round.
"""

from __future__ import annotations

import torch

from ..base import register_method
from ..locate.experts import fact_expert_keys
from ..locate.keys import keys
from ..locate.values import TINY_LOCATE
from ..memit.method import MEMIT
from .config import AlphaEditConfig


def null_space_projector(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """``U Uᵀ`` over the eigenvectors of ``mom2`` with eigenvalue below ``threshold``."""
    values, vectors = torch.linalg.eigh(mom2.to(torch.float64))
    null = vectors[:, values < threshold]
    if null.shape[1] == 0:
        raise ValueError(f"no eigenvalue of the key second moment is below nullspace_threshold={threshold} "
                         f"(smallest {values[0].item():.3g}); raise the threshold")
    return (null @ null.T).to(torch.float32)


@register_method
class AlphaEdit(MEMIT):
    name = "alphaedit"
    config_class = AlphaEditConfig
    summary = "like MEMIT, projected onto the null space of preserved keys (sequential editing)"
    tiny_settings = dict(TINY_LOCATE, layers=[1, 2], v_num_grad_steps=10)
    config: AlphaEditConfig

    def update_factor(self, k, mom2, module, state):
        d = k.shape[1]
        projector = (null_space_projector(mom2, self.config.nullspace_threshold).to(k.device)
                     if mom2 is not None else torch.eye(d, device=k.device))
        previous = (state or {}).get(f"keys.{module}")
        earlier = previous.to(k.device, torch.float32) if previous is not None else k.new_zeros((0, d))
        system = projector @ (k.T @ k + earlier.T @ earlier) + self.config.l2 * torch.eye(d, device=k.device)
        return torch.linalg.solve(system, projector @ k.T).T

    def finish(self, model, tokenizer, spec, facts, layers, state):
        out = {key: value.clone() for key, value in (state or {}).items()}
        for layer in layers:
            name = spec.mlp_out_name(layer)
            if spec.experts:  # each expert keeps the keys of the facts routed to it
                found = fact_expert_keys(model, tokenizer, spec, layer, facts, self.config.context_templates)
                rows: dict[str, list[torch.Tensor]] = {}
                for fact_keys in found:
                    for expert in fact_keys.experts:
                        rows.setdefault(f"keys.{name}.{expert}", []).append(fact_keys.keys[expert].cpu())
                added = {key: torch.stack(values) for key, values in rows.items()}
            else:
                added = {f"keys.{name}": keys(model, tokenizer, name, facts, self.config.context_templates).cpu()}
            for key, now in added.items():
                out[key] = torch.cat([out[key], now]) if key in out else now
        return out
