"""A small trainer for the methods that learn something (MEND's editor; later, memory packs' scope classifier).

The method supplies a :class:`Learner`: its trainable tensors, a loss on a batch of records, a held-out
evaluation, and its state. The trainer owns everything else, the same way for every learner:

- a **held-out split** chosen once from the seed and never trained on (its indices are in the result);
- a **fixed seed**: the batch order of every epoch is a permutation drawn from ``(seed, epoch)``, so a run is the
  same whether or not it was interrupted;
- **checkpoints** (``checkpoint_dir``, every ``checkpoint_every`` steps: the learner's and Adam's tensors as
  safetensors, then the step, curve and optimizer settings as JSON naming them, replaced in one rename; nothing is
  pickled): a run started again with the same directory resumes where the last checkpoint left it;
- a **progress bar** with the running loss and the latest held-out score, and the **learning curve** (training
  loss per ``eval_every`` steps beside the held-out scores) in the result.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from .._io import atomic_write_json, read_safetensors, write_safetensors

PROGRESS = "trainer.json"


class Learner(Protocol):
    """What a method that learns gives the :class:`Trainer`."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """The tensors to train (everything else stays frozen)."""
    def loss(self, batch: Sequence[Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch of records (differentiable) and figures to log beside it."""
    def evaluate(self, records: Sequence[Any]) -> dict[str, float]:
        """Held-out scores (higher is better for the first one, which the progress bar shows)."""
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor the learner needs to resume (parameters and buffers)."""
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s tensors."""


@dataclass
class TrainSettings:
    max_steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    seed: int = 0
    #: Records kept out of training and scored every ``eval_every`` steps and at the end.
    held_out: int = 100
    eval_every: int = 100
    checkpoint_every: int = 100
    #: Gradient norm clip (None: no clipping).
    clip: float | None = 100.0

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.held_out < 0 or self.lr <= 0:
            raise ValueError("held_out must be ≥ 0 and lr positive")


@dataclass
class TrainResult:
    steps: int
    seconds: float
    held_out: dict[str, float]
    curve: list[dict[str, Any]] = field(default_factory=list)
    held_out_indices: list[int] = field(default_factory=list)
    resumed_from: int = 0

    def summary(self) -> dict[str, Any]:
        """What an editor's manifest records about its training (the curve thinned to at most 50 points)."""
        every = max(1, math.ceil(len(self.curve) / 50))
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "held_out": self.held_out,
                "curve": self.curve[::every] + ([self.curve[-1]] if self.curve and (len(self.curve) - 1) % every else []),
                "resumed_from": self.resumed_from}


def split(n: int, held_out: int, seed: int) -> tuple[list[int], list[int]]:
    """Training and held-out indices of ``n`` records: a seeded shuffle, the last ``held_out`` held out."""
    if held_out >= n:
        raise ValueError(f"{n} records leave nothing to train on after holding out {held_out}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[: n - held_out]), sorted(order[n - held_out :])


class Trainer:
    """Adam over :meth:`Learner.parameters` on ``records`` (see the module docstring)."""

    def __init__(self, learner: Learner, records: Sequence[Any], settings: TrainSettings | None = None, *,
                 checkpoint_dir: str | Path | None = None, progress: bool = True,
                 identity: dict[str, Any] | None = None) -> None:
        """``identity``: what else a checkpoint must have been made with to be resumed (JSON values: the
        learner's settings, a digest of the records); a checkpoint made otherwise is refused."""
        self.learner = learner
        self.identity = json.loads(json.dumps(identity or {}))
        self.records = list(records)
        self.settings = settings or TrainSettings()
        self.settings.validate()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.progress = progress
        self.train_idx, self.held_idx = split(len(self.records), self.settings.held_out, self.settings.seed)
        self.optimizer = torch.optim.Adam(learner.parameters(), lr=self.settings.lr)

    def batch_indices(self, step: int) -> list[int]:
        """The training records of ``step`` (0-based): epoch permutations drawn from ``(seed, epoch)``."""
        size, n = self.settings.batch_size, len(self.train_idx)
        per_epoch = max(1, n // size)
        epoch, k = divmod(step, per_epoch)
        order = list(self.train_idx)
        random.Random(f"{self.settings.seed}:{epoch}").shuffle(order)
        return order[k * size : (k + 1) * size]

    # ---------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int, curve: list[dict[str, Any]], seconds: float) -> None:
        if self.checkpoint_dir is None:
            return
        tensors = {f"learner.{k}": v.detach().cpu().contiguous() for k, v in self.learner.state_dict().items()}
        opt = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, values in opt["state"].items():
            for key, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        name = f"state-{step:08d}.safetensors"
        record = {"step": step, "state_file": name, "curve": curve, "seconds": seconds,
                  "settings": asdict(self.settings), "identity": self.identity, "param_groups": opt["param_groups"], "optimizer_scalars": scalars}
        # The tensors go to a file of their own first; then the record that names them replaces the last one in
        # one rename; then older tensor files go. An interruption at any point leaves a consistent checkpoint.
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_safetensors(tensors, self.checkpoint_dir / name)
        atomic_write_json(self.checkpoint_dir / PROGRESS, record)
        for old in self.checkpoint_dir.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink()

    def load_checkpoint(self) -> tuple[int, list[dict[str, Any]], float]:
        """Resume from ``checkpoint_dir`` when it holds one; returns (step, curve, seconds so far)."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / PROGRESS).exists():
            return 0, [], 0.0
        record = json.loads((self.checkpoint_dir / PROGRESS).read_text(encoding="utf-8"))
        mine = {k: v for k, v in asdict(self.settings).items() if k != "max_steps"}
        theirs = {k: v for k, v in record["settings"].items() if k != "max_steps"}
        mine.update({f"identity.{k}": v for k, v in self.identity.items()})
        theirs.update({f"identity.{k}": v for k, v in record.get("identity", {}).items()})
        if mine != theirs:
            changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise ValueError(f"the checkpoint in {self.checkpoint_dir} was made with other settings ({', '.join(changed)}); "
                             "remove it to start again, or resume with the same settings")
        tensors = read_safetensors(self.checkpoint_dir / record["state_file"])
        self.learner.load_state_dict({k[len("learner."):]: v for k, v in tensors.items() if k.startswith("learner.")})
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, values in record["optimizer_scalars"].items():
            state.setdefault(int(index), {}).update(values)
        self.optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
        return int(record["step"]), list(record["curve"]), float(record["seconds"])

    # ---------------------------------------------------------------------------------- the loop
    def held_out_records(self) -> list[Any]:
        return [self.records[i] for i in self.held_idx]

    def fit(self) -> TrainResult:
        s = self.settings
        start, curve, seconds = self.load_checkpoint()
        resumed = start
        held = self.held_out_records()
        last_eval: dict[str, float] = {}
        bar = tqdm(total=s.max_steps, initial=start, desc="training", unit="step", disable=not self.progress)
        began = time.perf_counter() - seconds
        window: list[float] = []
        torch.manual_seed(s.seed + start)
        for step in range(start, s.max_steps):
            batch = [self.records[i] for i in self.batch_indices(step)]
            loss, figures = self.learner.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.learner.parameters(), s.clip)
            self.optimizer.step()
            window.append(float(loss.detach()))
            done = step + 1
            if done % s.eval_every == 0 or done == s.max_steps:
                last_eval = self.learner.evaluate(held) if held else {}
                curve.append({"step": done, "loss": round(sum(window) / len(window), 5),
                              **{k: round(v, 5) for k, v in figures.items()},
                              **{f"held_out_{k}": round(v, 4) for k, v in last_eval.items()}})
                window = []
            if done % s.checkpoint_every == 0 and done < s.max_steps:
                self.save_checkpoint(done, curve, time.perf_counter() - began)
            shown = {"loss": f"{window[-1] if window else float(loss.detach()):.3f}"}
            if last_eval:
                key = next(iter(last_eval))
                shown[f"held-out {key}"] = f"{last_eval[key]:.2f}"
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
        bar.close()
        if not last_eval and held:
            last_eval = self.learner.evaluate(held)
        # Resuming a checkpoint at or past ``max_steps`` finishes at once: a run may be cut short that way.
        return TrainResult(steps=max(s.max_steps, start), seconds=time.perf_counter() - began, held_out=last_eval,
                           curve=curve, held_out_indices=self.held_idx, resumed_from=resumed)
