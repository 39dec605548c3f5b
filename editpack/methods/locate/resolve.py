"""What a locate-then-edit config leaves open, filled in before an edit: the layers, the statistics' size and
corpus, the context prefixes, the optimisation's precision; and the key statistics of the edited layers."""

from __future__ import annotations

from pathlib import Path

import torch

from ..._io import sha256_file
from ...errors import EditpackError
from ...model.arch import ArchSpec
from ...model.generation import model_device
from ...model.stats import StatsConfig, default_tokens
from ...packs.statistics import StatsPack, cached_moments, install, stored
from ...share.hub import parse_reference, resolve_pack
from ..base import EditMethod
from .context import context_templates
from .model_state import resolve_optimize_dtype

def resolve_locate_config(cfg, method: EditMethod, model, tokenizer, spec: ArchSpec):
    """Fill in what a locate-then-edit config leaves open (layers, statistics size, context templates)."""
    method.resolve_layers(model, spec)
    if cfg.stats:
        use_statistics(cfg, model, spec)
    if cfg.stats_corpus and Path(cfg.stats_corpus).is_file() and not cfg.stats:
        digest = sha256_file(cfg.stats_corpus)
        if cfg.stats_corpus_sha256 not in (None, digest):
            raise EditpackError(f"statistics corpus {cfg.stats_corpus} is not the corpus this pack's statistics came "
                                f"from (sha256 {cfg.stats_corpus_sha256[:16]}…); pass that corpus, or set "
                                "stats_corpus_sha256=null to use this one")
        cfg.stats_corpus_sha256 = digest
    elif cfg.stats_corpus and cfg.stats_corpus_sha256 is None:
        raise EditpackError(f"statistics corpus {cfg.stats_corpus} does not exist")
    if cfg.mom2_adjustment and cfg.stats_tokens is None:
        cfg.stats_tokens = default_tokens(cfg.stats_corpus)
    if cfg.context_templates is None:
        cfg.context_templates = context_templates(model, tokenizer, cfg.context_template_lengths, cfg.seed)
    cfg.optimize_dtype = resolve_optimize_dtype(cfg.optimize_dtype, model_device(model))
    return cfg


def use_statistics(cfg, model, spec: ArchSpec) -> None:
    """``cfg.stats`` (a statistics artifact) checked against ``model``, kept in the local cache, and its corpus and
    token count made the edit's; the config records the artifact by reference and content, never by path."""
    try:
        found = resolve_pack(cfg.stats)
    except EditpackError:  # a pack extended elsewhere names them by name@version: the local cache may hold them
        found = stored(cfg.stats_content) if cfg.stats_content else None
        if found is None:
            raise
    if not isinstance(found, StatsPack):
        raise EditpackError(f"{cfg.stats} is a {found.kind} pack, not key statistics (editpack stats compute)")
    if cfg.stats_content not in (None, found.content_id):
        raise EditpackError(f"statistics {found.ref} are not the ones this pack was made with (content "
                            f"{cfg.stats_content[:19]}…)")
    found.check_model(model, spec)
    missing = [spec.mlp_out_name(layer) for layer in cfg.layers if spec.mlp_out_name(layer) not in found.entries]
    if missing:
        raise EditpackError(f"statistics {found.ref} hold {', '.join(sorted(found.entries))}, not {', '.join(missing)} "
                            "that this edit needs (give the layers they were computed for, or compute these)")
    install(found)
    source = found.config()
    cfg.stats = cfg.stats if parse_reference(cfg.stats) else found.ref  # a Hub reference, or name@version
    cfg.stats_content = found.content_id
    cfg.mom2_adjustment = True
    cfg.stats_corpus = source.corpus
    cfg.stats_corpus_sha256 = source.corpus_sha256
    cfg.stats_tokens, cfg.stats_tolerance = source.n_tokens, source.tolerance
    if source.corpus is None:
        cfg.seed = source.seed


def layer_second_moments(cfg, model, tokenizer, spec: ArchSpec, layers) -> dict[int, torch.Tensor | None]:
    """The cached key second moments at ``layers``, missing ones computed in one pass (``None`` for each when
    ``mom2_adjustment`` is off)."""
    if not cfg.mom2_adjustment:
        return {layer: None for layer in layers}
    stats = StatsConfig(corpus=cfg.stats_corpus, corpus_sha256=cfg.stats_corpus_sha256, n_tokens=cfg.stats_tokens,
                        seed=cfg.seed, tolerance=cfg.stats_tolerance)
    return cached_moments(model, tokenizer, spec, list(layers), stats)
