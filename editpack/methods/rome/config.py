"""ROME hyper-parameters (defaults follow the paper's GPT-2 XL / EasyEdit Llama settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..base import MethodConfig


@dataclass
class ROMEConfig(MethodConfig):
    #: Layers whose MLP output projection is edited; ``None`` takes the architecture spec's default.
    layers: list[int] | None = None
    #: Optimisation of the target value vector v*: 20 steps as in the ROME paper (EasyEdit's Llama files use 25).
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    #: Precision of the decoder blocks while δ is optimised: "float32", "bfloat16", or "auto" (bfloat16 where
    #: the device has fast bf16 arithmetic: a CUDA GPU that supports it, a CPU with AVX-512 BF16 / AMX; else
    #: float32). The resolved value is what the pack records. Keys, the covariance solve and the update stay in
    #: float32 either way.
    optimize_dtype: str = "auto"
    #: Context prefixes: (length in tokens, how many), sampled from the model with ``seed``. The resolved
    #: prefixes are recorded in ``context_templates`` so a pack says exactly what it was computed with.
    context_template_lengths: list[list[int]] = field(default_factory=lambda: [[5, 5], [10, 5]])
    context_templates: list[str] | None = None
    seed: int = 0
    #: Key statistics: ``mom2_adjustment=False`` uses C = I. ``stats_corpus=None`` samples text from the model.
    #: ``stats_tokens=None`` means 100,000 tokens of a corpus, or 20,000 sampled tokens (sampling is slow).
    mom2_adjustment: bool = True
    #: A path at run time; a pack records only the file's name and its sha256 (``stats_corpus_sha256``), which
    #: finds the cached statistics again when the pack is extended on a machine without the file.
    stats_corpus: str | None = None
    stats_corpus_sha256: str | None = None
    stats_tokens: int | None = None
    #: Ridge added to C (times its mean diagonal) before solving, for numerical safety.
    mom2_ridge: float = 1e-5

    def recorded(self) -> dict:
        values = super().recorded()
        if self.stats_corpus:
            values["stats_corpus"] = Path(self.stats_corpus).name
        return values
