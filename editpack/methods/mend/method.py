"""MEND (Mitchell et al. 2022, "Fast Model Editing at Scale").

For each edited MLP output projection ``W`` the fine-tuning gradient of the edit's loss is a sum of rank-1
terms ``δ_t u_tᵀ`` (``u_t`` the projection's input at token ``t``, ``δ_t`` the loss's gradient with respect to
its output; :func:`editpack.methods.targets.keys_and_gradients`). A small learned network ``g`` maps each
``[u_t, δ_t]`` (normalised by statistics gathered in training) to edited factors ``[ũ_t, δ̃_t]``: one network per
module shape, ``z + W₂ relu(W₁ (s_l ⊙ z + b_l))`` with a layer-specific scale and shift and ``W₂`` initialised to
zero (the identity), as MEND's ``IDMLP``. The edit is ``ΔW = −α_l Σ_t δ̃_t ũ_tᵀ`` with a learned per-layer step
``α_l``: a LoRA of rank ≤ tokens × facts per layer (``B = −α_l δ̃ᵀ``, ``A = ũ``). The tokens are each prompt's
subject-last token (``positions="subject"``, the default, at the architecture's middle ``run`` layers, edited in
two steps), those that predict the new answer (``"target"``, MEND's own, at the ``tail`` layers), or every position
the loss reaches (``"all"``, the authors' code). Several facts are edited at once by summing their terms, as MEND
does.

The network is meta-trained (:class:`MENDLearner`, run by :class:`editpack.methods.training.Trainer`): for a batch of
edits, the edit loss is the NLL of each new answer after its edit prompt and paraphrase *with the edit applied*,
the locality loss the KL from the unedited model's next-token distributions on unrelated prompts (the records'
neighbourhood prompts); ``c_edit · L_edit + L_loc`` is minimised over ``g`` and ``α`` while the model stays frozen.
The trained network is an :class:`editpack.packs.editor.Editor` artifact; editing needs one (``editor=``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from ...errors import EditpackError
from ...facts import Fact
from ...model.arch import ArchSpec, get_module
from ...model.generation import model_device, pad_id
from ...packs.base_model import describe_base
from ...packs.delta import LowRankDelta, WeightDelta
from ...packs.editor import Editor
from ...share.hub import parse_reference, resolve_pack
from ..base import EditMethod, register_method
from ..locate.model_state import frozen
from ..targets import keys_and_gradients, text_batch
from .config import MENDConfig


# ---------------------------------------------------------------------------------------------- the network
class GradientTransform(torch.nn.Module):
    """MEND's network for one module shape: normalise ``[u, δ]``, layer scale/shift, identity plus a ReLU MLP."""

    def __init__(self, d_in: int, d_out: int, layers: int, rank: int) -> None:
        super().__init__()
        d = d_in + d_out
        self.d_in = d_in
        self.scale = torch.nn.Parameter(torch.ones(layers, d))
        self.shift = torch.nn.Parameter(torch.zeros(layers, d))
        self.down = torch.nn.Linear(d, rank)
        self.up = torch.nn.Linear(rank, d)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("var", torch.ones(d))
        self.register_buffer("count", torch.zeros(1))

    @torch.no_grad()
    def observe(self, z: torch.Tensor) -> None:
        """Fold rows of ``[u, δ]`` into the normalisation statistics (Chan et al.'s parallel update); none (a
        module no loss reached in this batch) changes nothing."""
        if z.shape[0] == 0:
            return
        n, total = float(self.count), float(self.count) + z.shape[0]
        batch_mean, batch_var = z.mean(0), z.var(0, unbiased=False)
        delta = batch_mean - self.mean
        self.var.copy_((self.var * n + batch_var * z.shape[0] + delta.square() * n * z.shape[0] / total) / total)
        self.mean.add_(delta * z.shape[0] / total)
        self.count.fill_(total)

    def forward(self, u: torch.Tensor, delta: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = (torch.cat([u, delta], 1) - self.mean) / (self.var + 1e-8).sqrt()
        h = z * self.scale[layer] + self.shift[layer]
        z = z + self.up(F.relu(self.down(h)))
        return z[:, : self.d_in], z[:, self.d_in :]


class MENDNetwork(torch.nn.Module):
    """The editor: a :class:`GradientTransform` per module shape and a learned step per module."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, edit_lr: float) -> None:
        super().__init__()
        self.modules_order = list(shapes)
        groups: dict[str, list[str]] = {}
        for module, (out_f, in_f) in shapes.items():
            groups.setdefault(f"{out_f}x{in_f}", []).append(module)
        self.place = {m: (key, members.index(m)) for key, members in groups.items() for m in members}
        self.nets = torch.nn.ModuleDict({key: GradientTransform(shapes[members[0]][1], shapes[members[0]][0],
                                                                len(members), rank)
                                         for key, members in groups.items()})
        self.lrs = torch.nn.Parameter(torch.full((len(shapes),), float(edit_lr)))

    def factors(self, module: str, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the edit ``ΔW = B A`` from the raw factors of ``module`` (rows = tokens)."""
        key, layer = self.place[module]
        u_t, d_t = self.nets[key](u, delta, layer)
        step = self.lrs[self.modules_order.index(module)]
        return u_t, -step * d_t.T

    def observe(self, module: str, u: torch.Tensor, delta: torch.Tensor) -> None:
        self.nets[self.place[module][0]].observe(torch.cat([u, delta], 1))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}


def network_for(editor: Editor) -> MENDNetwork:
    """The network an editor's tensors and settings describe (shapes checked)."""
    shapes = {m: tuple(s) for m, s in editor.training.get("shapes", {}).items()}
    if list(shapes) != list(editor.trained_modules):
        raise EditpackError(f"editor {editor.ref}: its training record names no shape for every module it edits")
    cfg = editor.hyperparameters
    net = MENDNetwork(shapes, int(cfg["rank"]), float(cfg["edit_lr"]))
    expected = {k: list(v.shape) for k, v in net.state_dict().items()}
    found = {k: list(v.shape) for k, v in editor.tensors.items()}
    if expected != found:
        raise EditpackError(f"editor {editor.ref}: its tensors do not form a MEND network of rank {cfg['rank']} "
                            f"for {len(shapes)} modules")
    net.load_state_dict(editor.tensors)
    return net.eval()


@contextlib.contextmanager
def low_rank_added(model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """``W + B A`` at each module for the duration (a forward hook adding ``(x Aᵀ) Bᵀ``; differentiable in A and
    B, the weights untouched)."""
    handles = []
    for name, (A, B) in factors.items():
        def hook(_module, args, output, A=A, B=B):
            x = args[0]
            A, B = A.to(x.device), B.to(x.device)  # no copy where they are already there (training)
            return output + ((x.to(A.dtype) @ A.T) @ B.T).to(output.dtype)

        handles.append(get_module(model, name).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- editing
#: The steps a new editor edits (and is scored on held-out records) with, unless ``--set steps=N`` says otherwise.
NEW_EDITOR_STEPS = 2


@register_method
class MEND(EditMethod):
    name = "mend"
    config_class = MENDConfig
    layer_role = "run"
    summary = "a learned editor (MEND) turns the fine-tuning gradient into a low-rank edit; needs a trained editor"
    tiny_training = dict(layers=[2, 3], rank=8)
    trainable = True
    config: MENDConfig

    def editor(self) -> Editor:
        cfg = self.config
        if not cfg.editor:
            raise EditpackError("mend edits with a trained editor: pass editor=PATH or user/name@version "
                                "(`editpack train mend` makes one)")
        editor = resolve_pack(cfg.editor)
        if not isinstance(editor, Editor) or editor.method != self.name:
            raise EditpackError(f"{cfg.editor} is a {editor.kind} artifact of {editor.method}, not a MEND editor")
        if cfg.editor_content and cfg.editor_content != editor.content_id:
            raise EditpackError(f"editor {editor.ref} is not the one recorded (content {cfg.editor_content})")
        return editor

    def compute(self, model, tokenizer, facts: Sequence[Fact], spec: ArchSpec, state=None) -> WeightDelta:
        editor = self.editor()
        check_editor_base(model, editor)
        net = network_for(editor)
        modules = list(editor.trained_modules)
        positions = editor.hyperparameters.get("positions", "target")  # editors older than the setting: target
        cfg = self.config
        if cfg.steps is None:  # the editor's own number of steps (editors trained without one: MEND's single step)
            cfg.steps = int(editor.hyperparameters.get("steps") or 1)

        def one_step() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            keys, grads = gradient_factors(model, tokenizer, spec, modules, facts, positions)
            with torch.no_grad():
                return {m: tuple(t.contiguous() for t in net.factors(m, keys[m], grads[m])) for m in modules}

        result = stepped(model, cfg.steps, one_step)
        if not result.modules:
            raise EditpackError(f"editor {editor.ref} takes its factors at the {positions} positions, and no loss "
                                f"reaches them at its modules ({', '.join(modules)}) for these facts: nothing to edit")
        if not _is_hub_reference(cfg.editor):
            cfg.editor = editor.ref  # a pack never names a local path
        cfg.editor_content = editor.content_id
        return result

    # ------------------------------------------------------------------------------------------ training
    def learner(self, model, tokenizer, spec: ArchSpec) -> "MENDLearner":
        if self.config.steps is None:  # a new editor's own steps: two unless set (the measured recipe's)
            self.config.steps = NEW_EDITOR_STEPS
        modules = [spec.mlp_out_name(layer) for layer in sorted(self.resolve_layers(model, spec))]
        return MENDLearner(model, tokenizer, spec, modules, self.config)

    def editor_from(self, learner: "MENDLearner", *, name: str, version: str, training: dict[str, Any]) -> Editor:
        shapes = {m: list(s) for m, s in learner.shapes.items()}
        settings = {k: v for k, v in self.config.to_dict().items() if k not in ("editor", "editor_content")}
        return Editor(name=name, version=version, method=self.name, hyperparameters=settings, facts=[],
                      base=describe_base(learner.model, learner.modules), tensors=learner.network.tensors(),
                      trained_modules=learner.modules, training={**training, "shapes": shapes})


def _is_hub_reference(text: str | None) -> bool:

    return bool(text) and not Path(text).exists() and parse_reference(text) is not None


def gradient_factors(model, tokenizer, spec: ArchSpec, modules: Sequence[str], facts: Sequence[Fact],
                     positions: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The rank-1 factors ``(u_t, δ_t)`` the editor transforms, at ``positions``; rows whose input or gradient
    is zero (a sequence's last position, which no loss reaches) are dropped, as the authors' code does: they add
    nothing to the gradient, but the network would turn them into an update."""
    keys, grads = keys_and_gradients(model, tokenizer, spec, modules, facts, positions=positions)
    for m in modules:
        live = keys[m].ne(0).any(1) & grads[m].ne(0).any(1)
        keys[m], grads[m] = keys[m][live], grads[m][live]
    return keys, grads


def stepped(model, steps: int, one_step) -> WeightDelta:
    """``steps`` edit steps: each ``one_step()`` (the editor's ``(A, B)`` per module) sees the model with the
    earlier steps' edit added; the edit is their sum (:meth:`WeightDelta.add` stacks the factors: rank ≤ steps ×
    rows). Modules a step gives no rows (no loss reaches them) get nothing from it."""
    total = WeightDelta()
    for _ in range(steps):
        with low_rank_added(model, factor_pairs(total)):
            found = one_step()
        for m, (A, B) in found.items():
            if A.shape[0]:
                total.add(m, LowRankDelta(B=B, A=A))
    return total


def factor_pairs(delta: WeightDelta) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}``, what :func:`low_rank_added` adds."""
    return {m: (d.A, d.B) for m, d in delta.modules.items()}


def check_editor_base(model, editor: Editor) -> None:
    """An editor is trained for the original weights of its modules; another model (or one already carrying
    edits at those modules) is refused."""
    mine = describe_base(model, editor.trained_modules)
    theirs = editor.base.modules or {}
    differ = [m for m in editor.trained_modules if (mine.modules or {}).get(m) != theirs.get(m)]
    if differ:
        raise EditpackError(f"editor {editor.ref} was trained for {editor.base.id}; this model's {differ[0]} differs "
                            f"({len(differ)} of {len(editor.trained_modules)} modules)")


class MENDLearner:
    """MEND's meta-training objective for :class:`editpack.methods.training.Trainer` (records are :class:`Fact`\\ s with
    a paraphrase and neighbourhood prompts)."""

    def __init__(self, model, tokenizer, spec: ArchSpec, modules: list[str], config: MENDConfig) -> None:
        self.model, self.tokenizer, self.spec, self.modules, self.config = model, tokenizer, spec, modules, config
        self.shapes = {m: tuple(get_module(model, m).weight.shape) for m in modules}
        if spec.mlp_transposed:
            self.shapes = {m: (s[1], s[0]) for m, s in self.shapes.items()}
        self.network = MENDNetwork(self.shapes, config.rank, config.edit_lr)
        self.device = model_device(model)
        self.network.to(self.device)
        self.steps_seen = 0

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.network.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.network.state_dict(), "steps_seen": torch.tensor([self.steps_seen])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.steps_seen = int(state.pop("steps_seen", torch.tensor([0]))[0])
        self.network.load_state_dict(state)

    def factors(self, facts: Sequence[Fact], observe: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        keys, grads = gradient_factors(self.model, self.tokenizer, self.spec, self.modules, facts,
                                       self.config.positions)
        out = {}
        for m in self.modules:
            u, d = keys[m].to(self.device), grads[m].to(self.device)
            if observe:
                self.network.observe(m, u, d)
            out[m] = self.network.factors(m, u, d)
        return out

    def _locality_batch(self, facts: Sequence[Fact]) -> dict[str, torch.Tensor] | None:
        prompts = [p.prompt for f in facts for p in f.neighborhood[: self.config.locality_prompts]]
        if not prompts:
            return None
        rows = [self.tokenizer(p)["input_ids"] for p in prompts]
        width, pad = max(map(len, rows)), pad_id(self.tokenizer)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        counted = mask.bool()
        if self.config.locality_at == "answer":  # only the last real position: where the answer is predicted
            counted = torch.zeros_like(counted)
            counted[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])] = True
        return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device),
                "attention_mask": mask, "counted": counted}

    def _locality_kl(self, facts: Sequence[Fact], factors) -> torch.Tensor:
        """KL(unedited ‖ edited) of the next-token distributions on the facts' neighbourhood prompts, at the
        positions ``locality_at`` names (zero without any); differentiable in ``factors`` where gradients are
        enabled."""
        local = self._locality_batch(facts)
        if local is None:
            return torch.zeros((), device=self.device)
        counted = local.pop("counted")
        with torch.no_grad():
            base = self.model(**local).logits.float().log_softmax(-1)
        with low_rank_added(self.model, factors):
            after = self.model(**local).logits.float().log_softmax(-1)
        return (base.exp() * (base - after)).sum(-1)[counted].mean()

    def loss(self, batch: Sequence[Fact]) -> tuple[torch.Tensor, dict[str, float]]:
        observe = self.steps_seen < self.config.norm_steps
        self.network.train()
        with frozen(self.model):
            factors = self.factors(batch, observe=observe)
            pairs = [(f.text, f.target_new) for f in batch] + [(f.paraphrases[0], f.target_new)
                                                                for f in batch if f.paraphrases]
            edit_batch = text_batch(self.tokenizer, pairs, self.device)
            with torch.enable_grad():
                with low_rank_added(self.model, factors):
                    edit_loss = edit_batch.nll(edit_batch.logits(self.model)) / len(pairs)
                kl = self._locality_kl(batch, factors)
        self.steps_seen += 1
        loss = self.config.edit_weight * edit_loss + kl
        return loss, {"edit_nll": float(edit_loss.detach()), "locality_kl": float(kl.detach())}

    @torch.no_grad()
    def evaluate(self, records: Sequence[Fact]) -> dict[str, float]:
        """Each held-out fact edited on its own: the share whose new answer beats the true one (mean token NLL,
        CounterFact's prob_compare) after the edit prompt and after its paraphrase; the share of first
        neighbourhood prompts where the true answer still beats the new one (measured with the edit, and for
        the records whose unedited model prefers the true answer there); and the mean locality KL."""
        self.network.eval()
        wins, para, para_n, kept, kept_n, kls = 0, 0, 0, 0, 0, []
        for fact in records:
            neighbour = fact.neighborhood[0].prompt if fact.neighborhood else None
            held = neighbour is not None and not self._prefers_new(neighbour, fact)
            with torch.enable_grad():  # edited as edits with this editor will be: its number of steps
                factors = factor_pairs(stepped(self.model, self.config.steps or 1, lambda: self.factors([fact])))
            prompts = [fact.text] + list(fact.paraphrases[:1])
            with low_rank_added(self.model, factors):
                better = [self._prefers_new(p, fact) for p in prompts]
                if held:
                    kept, kept_n = kept + (not self._prefers_new(neighbour, fact)), kept_n + 1
            if neighbour is not None:
                kls.append(float(self._locality_kl([fact], factors)))
            wins += better[0]
            if len(better) > 1:
                para, para_n = para + better[1], para_n + 1
        n = max(1, len(records))
        return {"edit_success": wins / n, "paraphrase_success": para / max(1, para_n),
                "neighbourhood_kept": kept / max(1, kept_n), "locality_kl": sum(kls) / max(1, len(kls))}

    def _prefers_new(self, prompt: str, fact: Fact) -> bool:
        if not fact.target_true:
            return False
        batch = text_batch(self.tokenizer, [(prompt, fact.target_new), (prompt, fact.target_true)], self.device)
        token_nll = F.cross_entropy(batch.logits(self.model).float(), batch.tokens, reduction="none") * batch.weights
        new, true = token_nll[batch.rows == 0].sum(), token_nll[batch.rows == 1].sum()
        return bool(new < true)

