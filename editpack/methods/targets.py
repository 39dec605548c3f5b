"""Teacher-forced batches of facts: each prompt followed by its new target, and the positions that predict it;
and what one backward pass through such a batch gives at chosen modules (inputs and output gradients, the
rank-1 factors of the fine-tuning gradient that UltraEdit and MEND start from)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..facts import Fact
from ..model.arch import ArchSpec, get_module
from ..model.generation import continuation_ids, model_device, pad_id
from ..model.nethook import TraceDict
from .locate.keys import lookups
from .locate.model_state import frozen


@dataclass
class TargetBatch:
    """``inputs`` (right-padded ``input_ids`` / ``attention_mask``) and, for every target token, the row and the
    column that predicts it, the token, and ``1 / len(target)`` (so each fact's loss is its mean NLL)."""

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor
    cols: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor

    def logits(self, model) -> torch.Tensor:
        """The model's logits at the positions that predict the targets, ``(target tokens, vocab)``."""
        return model(**self.inputs).logits[self.rows, self.cols]

    def token_nll(self, logits_at: torch.Tensor) -> torch.Tensor:
        """The mean NLL over every target token of the batch (FT-M's masked loss)."""
        return torch.nn.functional.cross_entropy(logits_at.float(), self.tokens)

    def nll(self, logits_at: torch.Tensor) -> torch.Tensor:
        """The sum over facts of each fact's mean NLL, from the logits at ``(rows, cols)``."""
        return (torch.nn.functional.cross_entropy(logits_at.float(), self.tokens, reduction="none") * self.weights).sum()


def target_batch(tokenizer, facts: Sequence[Fact], device) -> TargetBatch:
    """Each fact's prompt followed by its new target."""
    return text_batch(tokenizer, [(fact.text, fact.target_new) for fact in facts], device)


def text_batch(tokenizer, pairs: Sequence[tuple[str, str]], device) -> TargetBatch:
    """Each ``(prompt, answer)``: the prompt followed by the answer (a space before it), as a target batch."""
    rows, positions, labels = [], [], []
    for f, (text, answer) in enumerate(pairs):
        prompt = tokenizer(text)["input_ids"]
        target = continuation_ids(tokenizer, answer, after=text)
        rows.append(prompt + target)
        for j, token in enumerate(target):
            positions.append((f, len(prompt) - 1 + j))
            labels.append((token, len(target)))
    pad, width = pad_id(tokenizer), max(map(len, rows))
    return TargetBatch(
        inputs={"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)},
        rows=torch.tensor([p[0] for p in positions], device=device),
        cols=torch.tensor([p[1] for p in positions], device=device),
        tokens=torch.tensor([t for t, _ in labels], device=device),
        weights=torch.tensor([1.0 / n for _, n in labels], device=device),
    )


#: Where :func:`keys_and_gradients` takes its rows: the positions that predict a target token, every position, or
#: each prompt's subject-last token (ROME's key: a row there changes what the model recalls about this subject).
KEY_POSITIONS = ("target", "all", "subject")


def check_key_positions(positions: str) -> None:
    if positions not in KEY_POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(map(repr, KEY_POSITIONS))}, not {positions!r}")


def keys_and_gradients(model, tokenizer, spec: ArchSpec, modules: Sequence[str], facts: Sequence[Fact],
                       batch: TargetBatch | None = None, positions: str = "target"
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """At each position that predicts a target token (``positions="target"``), or at every position of the
    prompts and targets (``"all"``: the prompt's positions get the gradient that flows back to them through
    attention): each module's input and the NLL's gradient with respect to its output (each fact's loss the mean
    over its target tokens), float32 on the CPU. The model's weights get no gradient and are left as they were."""
    check_key_positions(positions)
    batch = batch or target_batch(tokenizer, facts, model_device(model))
    if positions == "subject" and batch.inputs["input_ids"].shape[0] != len(facts):
        raise ValueError(f"subject positions need one row per fact, not {batch.inputs['input_ids'].shape[0]} rows "
                         f"for {len(facts)} facts")
    outputs: dict[str, torch.Tensor] = {}

    def keep(output, name):
        outputs[name] = output[0] if isinstance(output, (tuple, list)) else output
        return output

    def track(_module, _args, output):  # gradients flow from here: the embedding output is their leaf
        return output.detach().requires_grad_(True)

    embed = get_module(model, spec.embed).register_forward_hook(track)
    try:
        with frozen(model), torch.enable_grad(), TraceDict(model, list(modules), retain_input=True,
                                                           retain_output=False, edit_output=keep) as trace:
            loss = batch.nll(batch.logits(model))
            found = torch.autograd.grad(loss, [outputs[m] for m in modules])
    finally:
        embed.remove()
    if positions == "target":
        rows, cols = batch.rows, batch.cols
    elif positions == "subject":
        device = batch.inputs["input_ids"].device
        rows = torch.arange(len(facts), device=device)
        cols = torch.tensor([lookups(tokenizer, [fact.prompt], fact)[1][0] for fact in facts], device=device)
    else:
        rows, cols = batch.inputs["attention_mask"].nonzero(as_tuple=True)
    keys = {m: trace[m].input[rows, cols].detach().float().cpu() for m in modules}
    grads = {m: g[rows, cols].detach().float().cpu() for m, g in zip(modules, found)}
    return keys, grads
