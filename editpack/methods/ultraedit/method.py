"""UltraEdit (Gu et al. 2025): training-, subject- and memory-free lifelong editing.

For a batch of facts, on the model as it is now (earlier rounds applied, see :func:`editpack.extend`):

1. one forward and backward pass of the teacher-forced NLL of each fact's new target gives, at every edited MLP
   output projection and every position that predicts a target token, the **key** ``k`` (the projection's
   input) and the **gradient** ``g`` of the loss with respect to its output;
2. **lifelong normalisation**: running mean and variance of ``[k, g]`` (per edited module, over every round so
   far, kept in the pack's method state) are updated with this batch, and ``[k̂, ĝ]`` is ``[k, g]`` normalised;
3. each row's value shift is ``v = −lr · ‖k̂‖² · ĝ``, and the update is the ridge solution
   ``ΔW = Vᵀ K (KᵀK + λI)⁻¹ = Vᵀ (KKᵀ + λI)⁻¹ K``, stored as the factors ``B = Vᵀ``, ``A = (KKᵀ + λI)⁻¹ K``
   (rank ≤ the batch's target tokens; dense once that is cheaper, by the pack's rule).

Reference: the authors' ``predict_param_shifts`` (RunningMeanStd over keys and gradients, ``coeffs = −lr ·
‖k̂‖²``, ``solve(KᵀK + I, Kᵀ V)``). Nothing is optimised iteratively, so an edit costs one pass per batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...errors import EditpackError
from ...facts import Fact
from ...model.arch import ArchSpec
from ...packs.delta import LowRankDelta, WeightDelta
from ..base import EditMethod, register_method
from ..targets import keys_and_gradients
from .config import UltraEditConfig

#: Fewest target tokens the running statistics must have seen (a first round smaller than this is refused).
MIN_ROWS = 8


def running_update(state: dict[str, torch.Tensor], prefix: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``rows`` into the running mean and variance under ``prefix`` (Chan et al.'s parallel update, as
    RunningMeanStd does: mean 0, variance 1, count 1e-4 to start); returns the new mean and variance."""
    mean = state.get(f"{prefix}.mean", torch.zeros(rows.shape[1], dtype=torch.float64))
    var = state.get(f"{prefix}.var", torch.ones(rows.shape[1], dtype=torch.float64))
    count = state.get(f"{prefix}.count", torch.tensor([1e-4], dtype=torch.float64))
    rows = rows.double().cpu()
    batch_mean, batch_var, batch_count = rows.mean(0), rows.var(0, unbiased=False), float(rows.shape[0])
    total = count + batch_count
    delta = batch_mean - mean
    new_mean = mean + delta * batch_count / total
    new_var = (var * count + batch_var * batch_count + delta.square() * count * batch_count / total) / total
    state[f"{prefix}.mean"], state[f"{prefix}.var"], state[f"{prefix}.count"] = new_mean, new_var, total
    return new_mean, new_var


@register_method
class UltraEdit(EditMethod):
    name = "ultraedit"
    config_class = UltraEditConfig
    layer_role = "tail"
    summary = "training-free lifelong edits from one gradient with lifelong normalisation"
    experimental = ("after 1,000 edits on SmolLM2 the new answer beat the old one for 47 % of the facts (33 % before "
                    "editing; docs/results/lifelong.md): its keys, at the positions that answer, carry the relation "
                    "more than the subject, and a larger step moves the relation's other subjects with the edits")
    tiny_settings = dict(layers=[2, 3])
    tiny_fact_count = 8  # its first round normalises over at least 8 target tokens (one each here)
    config: UltraEditConfig

    def compute(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec, state=None) -> WeightDelta:
        cfg = self.config
        modules = [spec.mlp_out_name(layer) for layer in sorted(self.resolve_layers(model, spec))]
        keys: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
        grads: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
        for start in range(0, len(facts), cfg.facts_per_batch):
            k, g = keys_and_gradients(model, tokenizer, spec, modules, facts[start : start + cfg.facts_per_batch],
                                      positions=cfg.positions)
            for m in modules:
                keys[m].append(k[m])
                grads[m].append(g[m])
        new_state = {name: tensor.clone() for name, tensor in (state or {}).items()}
        result = WeightDelta()
        for m in modules:
            K, G = torch.cat(keys[m]), torch.cat(grads[m])  # (N, in), (N, out), float32
            mean, var = running_update(new_state, m, torch.cat([K, G], 1))
            if float(new_state[f"{m}.count"]) < MIN_ROWS:
                raise EditpackError(
                    f"UltraEdit normalises keys and gradients by statistics of every edited token so far; "
                    f"{int(float(new_state[f'{m}.count']))} target token(s) are too few to normalise by (a single "
                    f"row normalises to zero). Edit at least {MIN_ROWS} target tokens in the first round (several "
                    "facts at once); later rounds may be of any size")
            z = ((torch.cat([K, G], 1).double() - mean) / (var + cfg.norm_epsilon).sqrt()).float()
            k_hat, g_hat = z.split([K.shape[1], G.shape[1]], 1)
            V = -cfg.lr * k_hat.square().sum(1, keepdim=True) * g_hat  # (N, out)
            system = K @ K.T + cfg.ridge * torch.eye(K.shape[0])
            A = torch.linalg.solve(system, K)  # (N, in): ΔW = Vᵀ (KKᵀ + λI)⁻¹ K
            result.add(m, LowRankDelta(B=V.T.contiguous(), A=A.contiguous()))
        result.state = {name: tensor.float() if not name.endswith(".count") else tensor for name, tensor in
                        new_state.items()}
        return result
