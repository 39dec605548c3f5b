"""Batches split at the edited token, so the unchanging prefix is computed once and cached.

Locate-then-edit methods optimise a vector added at one token of each prompt (the subject's last token). In a
causal model nothing before that token depends on the vector, so each prompt is split there: the prefixes are
left-padded (so every split point lines up in one column) and run once to fill a KV cache; each optimisation
step then runs only the suffixes, right-padded, against a copy of that cache. The edited token is column 0 of
every suffix (``edit_columns``; when some prompt has no prefix at all, nothing is cached and the whole prompt
is the suffix). Positions come from the attention mask, so padding changes nothing.

The blocks below the edited one do not depend on the vector either: :meth:`SplitBatch.prime` can run the
suffixes through them once and record each block's output; :meth:`SplitBatch.run` then puts stand-ins in their
place that return those outputs, so each step computes only the blocks from the edited one up.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from ...model.generation import cache_argument, cache_of, pad_id


@dataclass
class SplitBatch:
    prefix_ids: torch.Tensor  # (B, P), left-padded; P may be 0
    prefix_mask: torch.Tensor
    prefix_positions: torch.Tensor
    suffix_ids: torch.Tensor  # (B, S), right-padded; column 0 is the split token
    suffix_mask: torch.Tensor
    suffix_positions: torch.Tensor
    suffix_lengths: list[int]
    edit_columns: list[int]  # where each row's split token sits in the suffix (0 unless nothing is cached)
    cache: Any = None
    blocks: torch.nn.ModuleList | None = None  # the model's decoder blocks, when some are replayed
    replay: dict[int, Any] = field(default_factory=dict)  # block index -> its recorded output on the suffixes

    @property
    def full_mask(self) -> torch.Tensor:
        return torch.cat([self.prefix_mask, self.suffix_mask], dim=1)

    def prime(self, model, blocks: torch.nn.ModuleList | None = None, live_from: int = 0) -> None:
        """Run the prefixes once and keep their KV cache (no gradients).

        With ``blocks`` (the model's decoder blocks) and ``live_from`` > 0, also run the suffixes once and record
        the outputs of blocks ``0 .. live_from - 1``, which :meth:`run` then replays instead of computing. Only
        valid when whatever changes between runs happens in block ``live_from`` or later.
        """
        if self.prefix_ids.shape[1] == 0:
            self.cache = None
        else:
            with torch.no_grad():
                out = model.base_model(input_ids=self.prefix_ids, attention_mask=self.prefix_mask,
                                       position_ids=self.prefix_positions, use_cache=True)
            self.cache = cache_of(out)
        self.blocks, self.replay = None, {}
        if blocks is None or live_from <= 0:
            return
        recorded: dict[int, Any] = {}

        def recorder(index):
            return lambda _module, _args, output: recorded.__setitem__(index, output)

        handles = [blocks[i].register_forward_hook(recorder(i)) for i in range(live_from)]
        try:
            with torch.no_grad():
                self._body(model)
        finally:
            for handle in handles:
                handle.remove()
        self.blocks, self.replay = blocks, recorded

    def run(self, model) -> torch.Tensor:
        """One pass of the suffixes through the transformer body (no LM head); returns its last hidden states.

        Hooks on the model see suffix columns only. The head is left to the caller, which needs it at a few
        positions only.
        """
        with _replaying(self.blocks, self.replay):
            return self._body(model).last_hidden_state

    def _body(self, model):
        cache = copy.deepcopy(self.cache) if self.cache is not None else None
        body = model.base_model
        return body(
            input_ids=self.suffix_ids, attention_mask=self.full_mask if cache is not None else self.suffix_mask,
            position_ids=self.suffix_positions, use_cache=cache is not None, **{cache_argument(body): cache},
        )


class _Replay(torch.nn.Module):
    """Stands in for a decoder block: returns the output recorded from it, computing nothing."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@contextlib.contextmanager
def _replaying(blocks: torch.nn.ModuleList | None, outputs: dict[int, Any]) -> Iterator[None]:
    """Blocks listed in ``outputs`` replaced by :class:`_Replay` stand-ins for the duration."""
    if blocks is None or not outputs:
        yield
        return
    originals = {i: blocks[i] for i in outputs}
    try:
        for i, output in outputs.items():
            blocks[i] = _Replay(output)
        yield
    finally:
        for i, block in originals.items():
            blocks[i] = block


def split_batch(tokenizer, texts: Sequence[str], split_at: Sequence[int], device) -> SplitBatch:
    """Tokenize ``texts`` and split each before token index ``split_at[i]`` (which starts the suffix)."""
    pad = pad_id(tokenizer)
    rows = [tokenizer(text)["input_ids"] for text in texts]
    for text, ids, cut in zip(texts, rows, split_at):
        if not 0 <= cut < len(ids):
            raise ValueError(f"split index {cut} is outside the {len(ids)} tokens of {text!r}")
    # A prefix that is empty in one row but not in others would leave that row with nothing to attend to in
    # the cached part; then cache nothing at all.
    cuts = list(split_at) if min(split_at) > 0 else [0] * len(rows)
    width_p = max(cuts)
    width_s = max(len(ids) - cut for ids, cut in zip(rows, cuts))
    prefix_ids, prefix_mask, suffix_ids, suffix_mask, lengths = [], [], [], [], []
    for ids, cut in zip(rows, cuts):
        head, tail = ids[:cut], ids[cut:]
        prefix_ids.append([pad] * (width_p - len(head)) + head)
        prefix_mask.append([0] * (width_p - len(head)) + [1] * len(head))
        suffix_ids.append(tail + [pad] * (width_s - len(tail)))
        suffix_mask.append([1] * len(tail) + [0] * (width_s - len(tail)))
        lengths.append(len(tail))
    as_tensor = lambda rows_: torch.tensor(rows_, dtype=torch.long, device=device).reshape(len(rows), -1)  # noqa: E731
    p_mask, s_mask = as_tensor(prefix_mask), as_tensor(suffix_mask)
    positions = (torch.cat([p_mask, s_mask], dim=1).cumsum(1) - 1).clamp(min=0)
    return SplitBatch(
        prefix_ids=as_tensor(prefix_ids), prefix_mask=p_mask, prefix_positions=positions[:, :width_p],
        suffix_ids=as_tensor(suffix_ids), suffix_mask=s_mask, suffix_positions=positions[:, width_p:],
        suffix_lengths=lengths, edit_columns=[cut - used for cut, used in zip(split_at, cuts)],
    )
