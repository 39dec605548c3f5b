"""Second-moment statistics of MLP keys (``C = E[k kᵀ]``): computed here, kept and shared as statistics
artifacts (:mod:`editpack.packs.statistics`, which also holds the local cache).

ROME and MEMIT solve for weight updates under the covariance of the keys an MLP output projection sees. Keys
are read at the projection's input over a text corpus (a JSONL file with a ``text`` field, or plain text split on
blank lines) or, when none is given, over text the model samples itself (seeded, so reproducible; the samples are
kept as token ids under ``$EDITPACK_HOME/samples``). A module's statistics are keyed by a fingerprint of every
weight that shapes its keys (embeddings and the blocks up to the layer), the module, the corpus content and the
token count (:func:`stats_key`). With a ``tolerance`` the token count is decided by a stopping rule instead: the
keys are read until the update they give, solved on held-out keys, moves less than the tolerance between
checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .._io import sha256_file, waiting_lock
from ..errors import EditpackError
from ..paths import cache_dir
from .arch import ArchSpec
from .experts import expert_inputs, experts_module
from .fingerprint import adapters_disabled, parameters_fingerprint
from .generation import model_device, pad_id, sample_from_start
from .nethook import TraceDict

log = logging.getLogger(__name__)

#: Keys read from a corpus when no count is given (``bench.stats_tokens`` measures counts against edit quality).
CORPUS_STATS_TOKENS = 100_000
#: Keys sampled from the model itself when there is no corpus (sampling is slow).
SAMPLED_STATS_TOKENS = 20_000
#: ``tokens="auto"``: the stopping rule's tolerance and the most it reads. At 0.01 the rule read about a million
#: tokens on SmolLM2 for scores a tenth of that gives (docs/results/statistics.md); 0.1 stops near 100,000.
AUTO_TOLERANCE = 0.1
AUTO_MAX_TOKENS = 1_000_000


def default_tokens(corpus) -> int:
    """How many keys statistics read when nothing says: :data:`CORPUS_STATS_TOKENS` of a corpus, else
    :data:`SAMPLED_STATS_TOKENS` sampled."""
    return SAMPLED_STATS_TOKENS if corpus is None else CORPUS_STATS_TOKENS


@dataclass(frozen=True)
class StatsConfig:
    """Where key statistics come from. ``corpus=None`` means text sampled from the model itself."""

    corpus: str | None = None
    corpus_sha256: str | None = None  # identifies the corpus's cached statistics when the file is not at hand
    n_tokens: int = CORPUS_STATS_TOKENS
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0
    #: ``--tokens auto``: stop once the solved update ``C⁻¹ K`` on held-out keys ``K`` moves by less than this
    #: (relative, Frobenius) between two checkpoints ``check_every`` tokens apart; ``n_tokens`` is then the most
    #: read. ``None``: read exactly ``n_tokens``.
    tolerance: float | None = None
    check_every: int = 10_000

    @property
    def tokens_setting(self) -> str | int:
        """What the token count is, as keys and manifests record it: a number, or the stopping rule."""
        return self.n_tokens if self.tolerance is None else f"auto:{self.tolerance:g}:max{self.n_tokens}"


def check_corpus_file(path: str | os.PathLike) -> Path:
    """Raise :class:`EditpackError` naming ``path`` unless it is a readable file that starts as UTF-8 text
    (JSONL with a ``text`` field, or plain text): checked before a model is loaded."""
    path = Path(path)
    if path.is_dir():
        raise EditpackError(f"corpus {path} is a directory; give a JSONL or plain-text file")
    if not path.is_file():
        raise EditpackError(f"corpus {path} does not exist or is not a regular file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError as exc:
        raise EditpackError(f"corpus {path} cannot be read: {exc.strerror}") from None
    try:
        text = head.decode("utf-8") if len(head) < 1 << 16 else head[:-4].decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise EditpackError(f"corpus {path} is not UTF-8 text (byte {exc.start}); give JSONL with a 'text' field "
                            "or plain text") from None
    if "\0" in text:
        raise EditpackError(f"corpus {path} holds NUL bytes: it is a binary file, not JSONL or plain text")
    if not text.strip():
        raise EditpackError(f"corpus {path} is empty")
    return path


def _corpus_texts(path: Path) -> Iterator[str]:
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise EditpackError(f"corpus {path} line {number}: not valid JSON: {exc.msg}") from None
                        text = record.get("text") if isinstance(record, dict) else None
                        if text:
                            yield text
        else:
            for block in path.read_text(encoding="utf-8").split("\n\n"):
                if block.strip():
                    yield block
    except UnicodeDecodeError as exc:
        raise EditpackError(f"corpus {path} is not UTF-8 text (byte {exc.start})") from None


def _corpus_chunks(tokenizer, path: Path, max_length: int) -> Iterator[list[int]]:
    for text in _corpus_texts(path):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), max_length):
            chunk = ids[start : start + max_length]
            if len(chunk) >= 8:
                yield chunk


SAMPLE_BATCH = 64  # sampling is step-bound: wide batches give most tokens per second
SAMPLE_LENGTH = 128
SAMPLE_TOP_K = 50


def _sample_path(model, spec: ArchSpec, config: StatsConfig) -> Path:
    """Where the model's own samples for ``config.seed`` are kept: keyed by the weights that decide them at the
    ends of the model (input embedding, final norm, output head), its depth and the sampling settings."""
    key = {
        "weights": parameters_fingerprint(model, [spec.embed + ".", spec.final_norm + ".", spec.lm_head + "."]),
        "model_type": model.config.model_type,
        "layers": spec.num_layers(model),
        "seed": config.seed, "batch": SAMPLE_BATCH, "length": min(config.max_length, SAMPLE_LENGTH),
        "top_k": SAMPLE_TOP_K,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir("samples") / f"{digest}.safetensors"


def sampled_rows(model, tokenizer, spec: ArchSpec, config: StatsConfig) -> list[list[int]]:
    """At least ``config.n_tokens`` tokens the model samples from its start token, in rows.

    Sampling is seeded per round of 64 rows (the global RNG is left untouched) and the rows are kept as token
    ids under ``$EDITPACK_HOME/samples``: every layer and every later request reuses them, and a request for more
    tokens samples only the rounds that are missing.
    """
    path = _sample_path(model, spec, config)
    with waiting_lock(path, "the model's own sample text"):
        rows: list[list[int]] = []
        if path.is_file():
            stored = load_file(str(path))
            rows = [r[: int(n)] for r, n in zip(stored["ids"].tolist(), stored["lengths"].tolist())]
        have = sum(map(len, rows))
        rounds = len(rows) // SAMPLE_BATCH
        added = False
        while have < config.n_tokens:
            with adapters_disabled(model):
                out = sample_from_start(model, tokenizer, SAMPLE_BATCH, min(config.max_length, SAMPLE_LENGTH),
                                        top_k=SAMPLE_TOP_K, seed=config.seed + rounds)
            new = out.tolist()
            rows.extend(new)
            have += sum(map(len, new))
            rounds += 1
            added = True
        if added:
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
            lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
            tmp = path.with_name(path.name + ".partial")
            save_file({"ids": ids, "lengths": lengths}, str(tmp))
            os.replace(tmp, path)
    return rows


def _corpus_id(config: StatsConfig) -> str:
    if config.corpus is None:
        return f"model-sampled-seed{config.seed}"
    path = Path(config.corpus)
    if path.is_file():
        return "corpus-" + sha256_file(path)[:16]
    if config.corpus_sha256:
        return "corpus-" + config.corpus_sha256[:16]
    raise FileNotFoundError(f"statistics corpus {path} does not exist")


def corpus_description(config: StatsConfig) -> str:
    """How a log line or a card names where the keys come from."""
    if config.corpus is None:
        return f"text the model samples itself (seed {config.seed})"
    return f"{Path(config.corpus).name}"


def stats_key(model, spec: ArchSpec, layer: int, config: StatsConfig) -> tuple[str, str]:
    """``(key, upstream)``: the cache key of ``layer``'s statistics under ``config`` and the fingerprint of every
    weight that shapes its keys (the input embedding and the blocks up to the layer)."""
    upstream = parameters_fingerprint(model, [spec.embed + "."] + [spec.block_name(i) + "." for i in range(layer + 1)])
    key = {
        "weights": upstream,
        "module": spec.mlp_out_name(layer),
        "corpus": _corpus_id(config),
        "n_tokens": config.tokens_setting,
        "max_length": config.max_length,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24], upstream


#: Held-out keys per layer the stopping rule solves on (taken from the first batch, which is then not counted).
PROBE_KEYS = 64


@torch.no_grad()
def compute_second_moments(model, tokenizer, spec: ArchSpec, layers: list[int],
                           config: StatsConfig) -> tuple[dict[int, torch.Tensor], int, dict]:
    """``({layer: E[k kᵀ]}, n, how)`` over ``config.n_tokens`` key vectors (or as many as the stopping rule reads)
    at the input of each layer's MLP output, all layers in one pass: one forward per batch, hooked at every layer,
    stopped after the deepest. ``how`` says what decided the count (the rule's checkpoints, with a tolerance)."""
    modules = {layer: spec.mlp_out_name(layer) for layer in sorted(layers)}
    # Mixture-of-Experts layers: the experts module is hooked (its input and the router's choice), and each
    # expert's keys are computed from the tokens routed to it (docs/concepts/moe.md).
    hooked = {layer: spec.experts_name(layer) or name for layer, name in modules.items()}
    device = model_device(model)
    if config.corpus is not None:
        if not Path(config.corpus).is_file():
            raise EditpackError(f"the key statistics for {', '.join(modules.values())} from corpus "
                                f"{Path(config.corpus).name} (sha256 {(config.corpus_sha256 or '?')[:16]}…) are not "
                                "cached here and the corpus is not at hand; pass it with --corpus (stats_corpus=PATH)")
        chunks = _corpus_chunks(tokenizer, Path(config.corpus), config.max_length)
        source = Path(config.corpus).name
    else:
        chunks = iter(sampled_rows(model, tokenizer, spec, config))
        source = "model-sampled text"
    totals: dict[int, torch.Tensor] = {}
    routed: dict[int, torch.Tensor] = {}  # MoE layers: tokens each expert was sent
    probes: dict[int, Any] = {}  # held-out keys: a layer's (k, d), or a MoE layer's {expert: (k, d)}
    previous: dict[int, torch.Tensor] = {}
    checkpoints: list[list] = []
    count = 0
    stopped = f"read {config.n_tokens:,} tokens"
    what = modules[min(modules)] if len(modules) == 1 else f"{len(modules)} layers"
    bar = tqdm(total=config.n_tokens, desc=f"key statistics {what} ({source})", unit="tok")
    pad = pad_id(tokenizer)
    pending: list[list[int]] = []

    def flush(rows: list[list[int]], hold_out: bool = False) -> int:
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        with TraceDict(model, list(hooked.values()), retain_input=True, retain_output=False, stop=True,
                       retain_args=bool(spec.experts)) as td:
            model(input_ids=ids, attention_mask=mask)
        for layer, name in hooked.items():
            if spec.experts:
                add_expert_moments(layer, td[name].args, mask, hold_out)
                continue
            keys = td[name].input[mask.bool()].float()
            if hold_out:  # the stopping rule's held-out keys: kept aside, not counted
                probes[layer] = keys[:: max(1, len(keys) // PROBE_KEYS)][:PROBE_KEYS].double().cpu()
                continue
            # One batch's sum in float32 (a few thousand rows: float32 keeps it to ~1e-6), the running total in
            # float64. A float64 product costs about twice as much on a CPU (more on GPUs without fast float64):
            # at d = 8,960 (Qwen2.5-1.5B) it made the statistics slower than the forward itself.
            product = (keys.T @ keys).double()
            totals[layer] = product if layer not in totals else totals[layer] + product
        return 0 if hold_out else int(mask.sum())

    def add_expert_moments(layer: int, args: tuple, mask: torch.Tensor, hold_out: bool) -> None:
        experts = experts_module(model, spec, layer)
        hidden, index = args[0], args[1]
        real = mask.reshape(-1).bool()
        hidden, index = hidden.reshape(-1, hidden.shape[-1])[real], index.reshape(-1, index.shape[-1])[real]
        number = experts.down_proj.shape[0]
        if layer not in totals:
            width = expert_inputs(experts, hidden[:1], 0).shape[1]
            totals[layer] = torch.zeros(number, width, width, dtype=torch.float64, device=hidden.device)
            routed[layer] = torch.zeros(number, dtype=torch.long)
        held: dict[int, torch.Tensor] = {}
        for expert in index.unique().tolist():
            if not 0 <= expert < number:
                continue
            keys = expert_inputs(experts, hidden[(index == expert).any(-1)], expert)
            if hold_out:  # the stopping rule's held-out keys of this expert
                held[expert] = keys[:: max(1, len(keys) // PROBE_KEYS)][:PROBE_KEYS].double().cpu()
                continue
            totals[layer][expert] += (keys.T @ keys).double()
            routed[layer][expert] += len(keys)
        if hold_out:
            probes[layer] = held

    def settled() -> bool:
        """The stopping rule at a checkpoint: has every layer's solved update stopped moving? (A MoE layer: every
        expert's, on its own held-out keys, taken together.)"""
        change = 0.0
        for layer, total in totals.items():
            if layer in routed:
                seconds = per_expert(total, routed[layer]).cpu()
                solved = torch.cat([_solve(seconds[e], keys).flatten() for e, keys in sorted(probes[layer].items())])
            else:
                solved = _solve((total / count).cpu(), probes[layer])
            if layer in previous:
                change = max(change, float((solved - previous[layer]).norm() / solved.norm().clamp_min(1e-30)))
            else:
                change = float("inf")
            previous[layer] = solved
        checkpoints.append([count, None if change == float("inf") else round(change, 5)])
        return change < config.tolerance

    started = time.monotonic()
    next_check = config.check_every
    for chunk in chunks:
        pending.append(chunk)
        if len(pending) == config.batch_size:
            if config.tolerance is not None and not probes:
                flush(pending, hold_out=True)
                pending = []
                continue
            added = flush(pending)
            pending = []
            if count == 0:  # the first batch tells how long the rest takes here
                rate = added / max(time.monotonic() - started, 1e-6)
                with tqdm.external_write_mode():  # a line of its own, not in the middle of the bar
                    log.info("  about %s at this machine's speed (%d tokens/s)%s",
                             _duration(max(config.n_tokens - added, 0) / rate), rate,
                             ", at most: a stopping rule decides" if config.tolerance is not None else "")
            count += added
            bar.update(added)
            if config.tolerance is not None and count >= next_check:
                next_check += config.check_every
                if settled():
                    stopped = (f"the solved update on {PROBE_KEYS} held-out keys moved less than "
                               f"{config.tolerance:g} between checkpoints {config.check_every:,} tokens apart")
                    break
            if count >= config.n_tokens:
                break
    else:
        if pending and not (config.tolerance is not None and not probes):
            added = flush(pending)
            count += added
            bar.update(added)
        stopped = f"the corpus ended after {count:,} tokens" if count < config.n_tokens else stopped
    bar.close()
    if not totals or count == 0:
        raise ValueError(f"statistics corpus {config.corpus} gave no text to compute key statistics from")
    how = {"stopped": stopped}
    if config.tolerance is not None:
        how.update(rule={"tolerance": config.tolerance, "check_every": config.check_every, "probe_keys": PROBE_KEYS,
                         "max_tokens": config.n_tokens}, checkpoints=checkpoints)
    if routed:
        how["expert_tokens"] = {modules[layer]: routed[layer].tolist() for layer in sorted(routed)}
    return {layer: (per_expert(total, routed[layer]) if layer in routed else total / count).to(torch.float32)
            for layer, total in totals.items()}, count, how


def _solve(second: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(C + εI)⁻¹ Kᵀ`` for held-out keys ``K`` (rows), the update direction the stopping rule watches."""
    ridge = max(1e-5 * float(second.diagonal().mean()), 1e-12)  # an expert no token reached yet: all zeros
    return torch.linalg.solve(second + ridge * torch.eye(len(second), dtype=second.dtype), keys.T)


def per_expert(totals: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(experts, d, d)`` second moments from sums over the tokens routed to each expert. An expert sent fewer
    tokens than its width ``d`` (too few for a full-rank estimate) gets the layer's average key scale times the
    identity instead; ``expert_tokens`` in the statistics' provenance says which."""
    width = totals.shape[-1]
    pooled = totals.sum(0) / max(int(counts.sum()), 1)
    fallback = torch.eye(width, dtype=totals.dtype, device=totals.device) * pooled.diagonal().mean()
    return torch.stack([totals[e] / int(n) if int(n) >= width else fallback for e, n in enumerate(counts)])


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
