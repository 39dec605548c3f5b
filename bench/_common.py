"""What the benchmark scripts share: the floors they measure editpack against, a private cache, JSON output.

A floor is the least work the same job needs, written with plain PyTorch and measured in the same process:

- :func:`delta_loop_floor`: the bare value optimisation of a locate-then-edit method: Adam steps on one vector
  δ added to a module's output at each prompt's subject token, forward and backward through the model body,
  NLL on the new target's tokens, nothing else (no KL term, keys, statistics, covariance solve or pack);
- :func:`forward_floor`: a plain forward over the same batches as the key statistics, stopped after the block
  the statistics need.

A benchmark run as a command (``python3 -m bench.NAME``) prints only its own lines and progress bars: the
libraries' warnings are silenced as editpack's commands silence them (``EDITPACK_VERBOSE=1`` shows them).
Imported by the tests, nothing is changed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from editpack import console
from editpack._io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _run_as_command() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name.startswith("bench.")


if _run_as_command():
    console.configure(verbose=os.environ.get("EDITPACK_VERBOSE") == "1")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def private_home() -> Iterator[str]:
    """``EDITPACK_HOME`` set to a fresh temporary folder for the duration (nothing cached is reused by accident)."""
    home = tempfile.mkdtemp(prefix="editpack-bench-home-")
    previous = os.environ.get("EDITPACK_HOME")
    os.environ["EDITPACK_HOME"] = home
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)
        if previous is None:
            os.environ.pop("EDITPACK_HOME", None)
        else:
            os.environ["EDITPACK_HOME"] = previous


def emit(result: dict, out: str | None) -> dict:
    """Print ``result`` as one JSON object and, with ``out``, write it there too."""
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")
    return result


def checkpoint(result: dict, out: str | os.PathLike) -> None:
    """Write ``result`` (with the process's peak RSS so far) to ``out`` atomically: a long run keeps what it has."""
    import resource

    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")


def in_dtype(model, dtype_name: str):
    """``model`` itself when its weights are in ``dtype_name`` already, else a copy cast to it."""
    dtype = getattr(torch, dtype_name)
    return model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)


def delta_loop_floor(model, tokenizer, module: str, prompts: Sequence[tuple[list[str], list[int], list[int]]],
                     steps: int, lr: float = 0.5) -> float:
    """Seconds for ``steps`` Adam steps of the bare δ loop (see the module docstring) for one or more facts in
    one batch, each with its own δ; ``prompts`` holds each fact's
    :func:`editpack.methods.locate.rewrite_lookups`. ``model`` should be
    in the precision editpack optimises in (:func:`in_dtype`)."""
    device = next(model.parameters()).device
    texts = [t for texts, _, _ in prompts for t in texts]
    owners = [f for f, (texts_, _, _) in enumerate(prompts) for _ in texts_]
    idxs = [i for _, idxs_, _ in prompts for i in idxs_]
    targets = [ids for f, (texts_, _, ids) in enumerate(prompts) for _ in texts_]
    from editpack.model.generation import padding_side

    with padding_side(tokenizer, "right"):
        batch = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    lengths = mask.sum(1).tolist()
    rows = torch.arange(len(texts), device=device)
    at = torch.tensor(idxs, device=device)
    owner = torch.tensor(owners, device=device)
    target_rows = torch.tensor([r for r, t in enumerate(targets) for _ in t], device=device)
    target_cols = torch.tensor([lengths[r] - len(t) + j for r, t in enumerate(targets) for j in range(len(t))],
                               device=device)
    tokens = torch.tensor([token for t in targets for token in t], device=device)
    head = model.get_output_embeddings()
    delta = torch.zeros(len(prompts), model.config.hidden_size, device=device, requires_grad=True)

    def add(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.index_put((rows, at), hidden[rows, at] + delta[owner].to(hidden.dtype))
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    from editpack.methods.locate.model_state import attention_for_gradients, frozen

    # No parameter gradients, and on a CPU the matmul ("eager") attention, whose backward is fast; both restored.
    with frozen(model), attention_for_gradients(model), torch.enable_grad():
        handle = model.get_submodule(module).register_forward_hook(add)
        try:
            synchronize(device)
            start = time.perf_counter()
            optimizer = torch.optim.Adam([delta], lr=lr)
            for _ in range(steps):
                optimizer.zero_grad()
                hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = head(hidden[target_rows, target_cols]).float()
                # The facts' losses summed: each δ gets its own fact's gradient.
                loss = torch.nn.functional.cross_entropy(logits, tokens, reduction="sum") / len(rows)
                loss.backward()
                optimizer.step()
            synchronize(device)
            return time.perf_counter() - start
        finally:
            handle.remove()


@torch.no_grad()
def forward_floor(model, tokenizer, spec, layer: int, config) -> tuple[float, int]:
    """Seconds and tokens of a plain forward over the key statistics' batches, stopped after ``layer``'s block."""
    from editpack.model import stats
    from editpack.model.generation import pad_id
    from editpack.model.nethook import Trace

    pad, rows, count = pad_id(tokenizer), [], 0
    device = next(model.parameters()).device
    synchronize(device)
    start = time.perf_counter()
    for chunk in stats._corpus_chunks(tokenizer, Path(config.corpus), config.max_length):
        rows.append(chunk)
        if len(rows) == config.batch_size:
            width = max(map(len, rows))
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            with Trace(model, spec.block_name(layer), retain_output=False, stop=True):
                model(input_ids=ids, attention_mask=mask)
            count += int(mask.sum())
            rows = []
            if count >= config.n_tokens:
                break
    synchronize(device)
    return time.perf_counter() - start, count


class StepCounter:
    """Counts the δ-optimisation steps editpack's locate-then-edit methods take, and the seconds spent in that
    loop (a benchmark's instrument: the floor runs the same number of steps; the rest of an edit is overhead)."""

    def __init__(self) -> None:
        from editpack.methods.locate import values as locate
        from editpack.methods.memit import method as memit

        self._modules = (locate, memit)  # ROME calls it through locate; MEMIT imports it
        self._original = locate.optimize_deltas
        self.steps: list[int] = []
        self.seconds = 0.0

    def __enter__(self) -> "StepCounter":
        def counting(model, *args, **kwargs):
            device = next(model.parameters()).device
            synchronize(device)
            start = time.perf_counter()
            out = self._original(model, *args, **kwargs)
            synchronize(device)
            self.seconds += time.perf_counter() - start
            self.steps.extend(o.steps for o in out)
            return out

        for module in self._modules:
            module.optimize_deltas = counting
        return self

    def __exit__(self, *exc) -> None:
        for module in self._modules:
            module.optimize_deltas = self._original
