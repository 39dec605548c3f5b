"""Second-moment statistics of MLP keys (``C = E[k kᵀ]``), computed once and cached on disk.

ROME and MEMIT solve for weight updates under the covariance of the keys an MLP output projection sees. Keys
are read at the projection's input over a text corpus (a JSONL file with a ``text`` field, or plain text split on
blank lines) or, when none is given, over text the model samples itself (seeded, so reproducible). Results are
cached under ``$EDITPACK_HOME/stats`` keyed by a fingerprint of every weight that shapes those keys (embeddings
and the blocks up to the layer), the module, the corpus content and the token count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ._io import sha256_file, waiting_lock
from .arch import ArchSpec
from .errors import EditpackError
from .fingerprint import adapters_disabled, parameters_fingerprint
from .generation import model_device, pad_id, sample_from_start
from .nethook import Trace
from .paths import cache_dir


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsConfig:
    """Where key statistics come from. ``corpus=None`` means text sampled from the model itself."""

    corpus: str | None = None
    corpus_sha256: str | None = None  # identifies the corpus's cached statistics when the file is not at hand
    n_tokens: int = 100_000
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0


def _corpus_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    text = record.get("text") if isinstance(record, dict) else None
                    if text:
                        yield text
    else:
        for block in path.read_text(encoding="utf-8").split("\n\n"):
            if block.strip():
                yield block


def _corpus_chunks(tokenizer, path: Path, max_length: int) -> Iterator[list[int]]:
    for text in _corpus_texts(path):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), max_length):
            chunk = ids[start : start + max_length]
            if len(chunk) >= 8:
                yield chunk


def _sampled_chunks(model, tokenizer, config: StatsConfig) -> Iterator[list[int]]:
    """Token chunks the model samples from its start token (seeded; the global RNG is left untouched)."""
    batch = max(config.batch_size, 64)  # sampling is step-bound: wide batches give most tokens per second
    round_ = 0
    while True:
        out = sample_from_start(model, tokenizer, batch, min(config.max_length, 128), top_k=50,
                                seed=config.seed + round_)
        yield from out.tolist()
        round_ += 1


def _corpus_id(config: StatsConfig) -> str:
    if config.corpus is None:
        return f"model-sampled-seed{config.seed}"
    path = Path(config.corpus)
    if path.is_file():
        return "corpus-" + sha256_file(path)[:16]
    if config.corpus_sha256:
        return "corpus-" + config.corpus_sha256[:16]
    raise FileNotFoundError(f"statistics corpus {path} does not exist")


def stats_cache_path(model, spec: ArchSpec, layer: int, config: StatsConfig) -> Path:
    upstream = [spec.embed + "."] + [spec.block_name(i) + "." for i in range(layer + 1)]
    key = {
        "weights": parameters_fingerprint(model, upstream),
        "module": spec.mlp_out_name(layer),
        "corpus": _corpus_id(config),
        "n_tokens": config.n_tokens,
        "max_length": config.max_length,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir("stats") / f"{spec.mlp_out_name(layer)}-{digest}.safetensors"


@torch.no_grad()
def compute_second_moment(model, tokenizer, spec: ArchSpec, layer: int, config: StatsConfig) -> tuple[torch.Tensor, int]:
    """``(E[k kᵀ], n)`` over ``config.n_tokens`` key vectors at the input of layer ``layer``'s MLP output."""
    module = spec.mlp_out_name(layer)
    device = model_device(model)
    if config.corpus is not None:
        if not Path(config.corpus).is_file():
            raise EditpackError(f"the key statistics for {module} from corpus {Path(config.corpus).name} (sha256 "
                                f"{(config.corpus_sha256 or '?')[:16]}…) are not cached here and the corpus is not at "
                                "hand; pass it with --corpus (stats_corpus=PATH)")
        chunks = _corpus_chunks(tokenizer, Path(config.corpus), config.max_length)
        source = Path(config.corpus).name
    else:
        chunks = _sampled_chunks(model, tokenizer, config)
        source = "model-sampled text"
    total: torch.Tensor | None = None
    count = 0
    bar = tqdm(total=config.n_tokens, desc=f"key statistics {module} ({source})", unit="tok")
    pad = pad_id(tokenizer)
    pending: list[list[int]] = []

    def flush(rows: list[list[int]]) -> int:
        nonlocal total
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        with Trace(model, module, retain_input=True, retain_output=False, stop=True) as tr:
            model(input_ids=ids, attention_mask=mask)
        keys = tr.input[mask.bool()].to(torch.float64)
        total = keys.T @ keys if total is None else total + keys.T @ keys
        return keys.shape[0]

    started = time.monotonic()
    for chunk in chunks:
        pending.append(chunk)
        if len(pending) == config.batch_size:
            added = flush(pending)
            pending = []
            if count == 0:  # the first batch tells how long the rest takes here
                rate = added / max(time.monotonic() - started, 1e-6)
                log.info("  about %s at this machine's speed (%d tokens/s)",
                         _duration(max(config.n_tokens - added, 0) / rate), rate)
            count += added
            bar.update(added)
            if count >= config.n_tokens:
                break
    else:
        if pending:
            added = flush(pending)
            count += added
            bar.update(added)
    bar.close()
    if total is None or count == 0:
        raise ValueError(f"statistics corpus {config.corpus} gave no text to compute key statistics from")
    return (total / count).to(torch.float32), count


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def second_moment(model, tokenizer, spec: ArchSpec, layer: int, config: StatsConfig) -> torch.Tensor:
    """Cached :func:`compute_second_moment` (computed under a file lock, written atomically)."""
    path = stats_cache_path(model, spec, layer, config)
    with waiting_lock(path, f"key statistics for {spec.mlp_out_name(layer)}"):
        if path.is_file():
            return load_file(str(path))["mom2"]
        source = (f"{config.n_tokens:,} tokens of {Path(config.corpus).name}" if config.corpus else
                  f"{config.n_tokens:,} tokens the model samples itself (slow: --corpus FILE with plain text or JSONL "
                  "is faster)")
        log.info("Computing key statistics for %s from %s, once: they are cached in %s for every later edit.",
                 spec.mlp_out_name(layer), source, path.parent)
        with adapters_disabled(model):  # statistics of the base model, also while packs are applied
            mom2, count = compute_second_moment(model, tokenizer, spec, layer, config)
        tmp = path.with_name(path.name + ".partial")
        metadata = {"count": str(count), **{k: str(v) for k, v in asdict(config).items()}}
        save_file({"mom2": mom2.contiguous()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)  # atomic: readers never see a partial file
    return mom2
