"""What a locate-then-edit config leaves open, filled in before an edit: the layers, the statistics' size and
corpus, the context prefixes, the optimisation's precision; and the key statistics of the edited layers."""

from __future__ import annotations

from pathlib import Path

import torch

from ..._io import sha256_file
from ...errors import EditpackError
from ...model.arch import ArchSpec
from ...model.generation import model_device
from ...model.stats import StatsConfig, second_moments
from ..base import EditMethod
from .context import context_templates
from .model_state import resolve_optimize_dtype

CORPUS_STATS_TOKENS = 100_000


SAMPLED_STATS_TOKENS = 20_000


def resolve_locate_config(cfg, method: EditMethod, model, tokenizer, spec: ArchSpec):
    """Fill in what a locate-then-edit config leaves open (layers, statistics size, context templates)."""
    method.resolve_layers(model, spec)
    if cfg.stats_corpus and Path(cfg.stats_corpus).is_file():
        digest = sha256_file(cfg.stats_corpus)
        if cfg.stats_corpus_sha256 not in (None, digest):
            raise EditpackError(f"statistics corpus {cfg.stats_corpus} is not the corpus this pack's statistics came "
                                f"from (sha256 {cfg.stats_corpus_sha256[:16]}…); pass that corpus, or set "
                                "stats_corpus_sha256=null to use this one")
        cfg.stats_corpus_sha256 = digest
    elif cfg.stats_corpus and cfg.stats_corpus_sha256 is None:
        raise EditpackError(f"statistics corpus {cfg.stats_corpus} does not exist")
    if cfg.mom2_adjustment and cfg.stats_tokens is None:
        cfg.stats_tokens = SAMPLED_STATS_TOKENS if cfg.stats_corpus is None else CORPUS_STATS_TOKENS
    if cfg.context_templates is None:
        cfg.context_templates = context_templates(model, tokenizer, cfg.context_template_lengths, cfg.seed)
    cfg.optimize_dtype = resolve_optimize_dtype(cfg.optimize_dtype, model_device(model))
    return cfg


def layer_second_moments(cfg, model, tokenizer, spec: ArchSpec, layers) -> dict[int, torch.Tensor | None]:
    """The cached key second moments at ``layers``, missing ones computed in one pass (``None`` for each when
    ``mom2_adjustment`` is off)."""
    if not cfg.mom2_adjustment:
        return {layer: None for layer in layers}
    stats = StatsConfig(corpus=cfg.stats_corpus, corpus_sha256=cfg.stats_corpus_sha256, n_tokens=cfg.stats_tokens,
                        seed=cfg.seed)
    return second_moments(model, tokenizer, spec, list(layers), stats)
