"""Weight packs: a versioned directory holding a weight delta as a PEFT LoRA adapter, a manifest and a card.

Format v1 (see ``docs/concepts/pack-format.md``)::

    editpack.json               manifest: format, name, version, base model + fingerprint, method and
                                hyper-parameters, facts, sha256 of every other file
    adapter_config.json         PEFT LoraConfig (one LoRA per edited module; rank_pattern/alpha_pattern keep
    adapter_model.safetensors   the scaling at exactly 1, so B @ A is the delta bit for bit)
    method_state.safetensors    (optional) what the method needs to extend the pack (AlphaEdit's keys)
    README.md                   the evaluation card (Hugging Face model card)

Only JSON and safetensors are read: nothing is ever unpickled. Saving is atomic (the whole directory appears
at once or not at all). Loading checks, besides the file hashes (:mod:`editpack.packs.artifact`), that the adapter's
tensors are finite and are what the manifest's ``delta`` section describes (modules, ranks, shapes, content
hash), and that ``adapter_config.json`` is the configuration PEFT needs to load exactly these tensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._io import read_safetensors, write_safetensors
from .._lazy import peft
from ..errors import PackFormatError
from .artifact import Artifact, register_kind
from .delta import ExpertsDelta, LowRankDelta, WeightDelta
from .manifest import MANIFEST, content_digest, section

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STATE = "method_state.safetensors"
#: The key of a LoRA factor in a saved PEFT adapter (no adapter name, as ``save_pretrained`` writes them).
ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def adapter_module(name: str, delta: LowRankDelta) -> str:
    """The module PEFT puts the LoRA of ``name`` on: the module itself, or for a stacked experts parameter
    (:class:`ExpertsDelta`, PEFT's ``target_parameters``) the module that owns it."""
    return name.rpartition(".")[0] if isinstance(delta, ExpertsDelta) else name


def lora_state_dict(factors: dict[str, LowRankDelta]) -> dict[str, torch.Tensor]:
    """``{module: B @ A}`` factors under PEFT's saved key names, float32, contiguous, on the CPU."""
    state = {}
    for name, d in factors.items():
        module = adapter_module(name, d)
        state[f"base_model.model.{module}.lora_A.weight"] = d.A.detach().float().contiguous().cpu()
        state[f"base_model.model.{module}.lora_B.weight"] = d.B.detach().float().contiguous().cpu()
    return state


#: A delta whose Frobenius norm is over this multiple of the weight it edits does not edit that weight, it replaces
#: it: such a pack (damaged, or made to break a model) is refused at load and when applied. Real edits are far
#: below it; the tests' tiny random models, edited with ROME's norm clamp lifted, reach a few hundred.
MAX_DELTA_RATIO = 1e4


def check_delta_scale(pack: "EditPack", norms: dict[str, float], what: str) -> None:
    """Raise :class:`PackFormatError` when a module's ‖ΔW‖ exceeds :data:`MAX_DELTA_RATIO` × ``norms[module]``
    (the weight's norm, as ``what`` says: recorded in the manifest, or this model's)."""
    for module, delta in sorted(pack.delta.modules.items()):
        weight = norms.get(module)
        if weight is None:
            continue
        size = delta.norm()
        if not size <= MAX_DELTA_RATIO * weight:  # also refuses an infinite norm
            raise PackFormatError(
                f"pack {pack.ref}: the delta of {module} has norm {size:.3g}, {size / weight:.3g} times the norm of "
                f"the weight it edits ({weight:.3g}, {what}); at most {MAX_DELTA_RATIO:g} times is an edit, this "
                "would replace the weights (damaged or hostile pack)")


def stored_dense(delta: LowRankDelta) -> bool:
    """Whether a delta is stored dense: its factors would not be smaller than the matrix itself (never for
    stacked experts, whose factors PEFT's parameter LoRA takes as they are)."""
    if isinstance(delta, ExpertsDelta):
        return False
    rows, cols = delta.B.shape[0], delta.A.shape[1]
    return delta.rank * (rows + cols) >= rows * cols


@register_kind
@dataclass(kw_only=True)
class EditPack(Artifact):
    """A weight-delta edit pack, in memory. :meth:`save` writes it; :meth:`load` reads and verifies one."""

    delta: WeightDelta
    fan_in_fan_out: bool = False

    kind: ClassVar[str] = "weight"
    payload_files: ClassVar[tuple[str, ...]] = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    holds_weights: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    scores_logits: ClassVar[bool] = True
    is_peft_adapter: ClassVar[bool] = True
    card_tag: ClassVar[str] = "lora"

    def storage_summary(self) -> str:
        stored = self.stored_factors()
        ranks = sorted({d.rank for d in stored.values()})
        dense = [m for m, d in stored.items() if stored_dense(d)]
        return (f"a PEFT LoRA adapter ({len(stored)} module{'s' if len(stored) != 1 else ''}: "
                + ", ".join(f"`{m}`" for m in sorted(stored)) + f"; rank {'/'.join(map(str, ranks))}"
                + (f"; {len(dense)} stored dense" if dense else "") + ")")

    # ------------------------------------------------------------------------------------------ PEFT form
    @property
    def modules(self) -> list[str]:
        return sorted(self.delta.modules)

    def parts(self) -> dict[str, str]:
        return {m: "dense" if stored_dense(d) else f"rank {d.rank}" for m, d in self.stored_factors().items()}

    def module_shape(self, module: str) -> tuple[int, int]:
        delta = self.delta.modules[module]
        return int(delta.B.shape[0]), int(delta.A.shape[1])

    @property
    def adapter_name(self) -> str:
        """The name this pack's adapter gets inside a PEFT model (PEFT forbids dots)."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", f"{self.name}-v{self.version}")

    @property
    def content_id(self) -> str:
        """``sha256:<hex>`` of the delta itself (module names and factors), independent of files and metadata.

        Lineage records use it: a pack made on top of another names that parent by name, version and this id.
        """
        return self.delta_content

    @property
    def delta_content(self) -> str:
        """``sha256:<hex>`` of the adapter's tensors (what the manifest's ``delta.content`` records)."""
        return adapter_content_id(self.adapter_state_dict())

    def stored_factors(self) -> dict[str, LowRankDelta]:
        """The factors as saved: low-rank while that is smaller than the dense matrix, else dense.

        A dense delta ΔW (out × in) is stored as the LoRA pair (I, ΔW) or (ΔW, I), whichever has the smaller
        rank min(out, in), so the adapter stays an ordinary PEFT LoRA while costing about a dense matrix.
        """
        stacked = [d.rank for d in self.delta.modules.values() if isinstance(d, ExpertsDelta)]
        # PEFT's parameter LoRA takes its rank from ``r`` alone (a rank pattern does not reach it): stacked
        # experts share the largest rank, padded with zero factors.
        return {name: LowRankDelta.from_dense(d.dense().float()) if stored_dense(d)
                else d.padded(max(stacked)) if isinstance(d, ExpertsDelta) else d
                for name, d in sorted(self.delta.modules.items())}

    @property
    def stacked_modules(self) -> list[str]:
        """The stacked experts parameters the pack edits (PEFT ``target_parameters``)."""
        return sorted(n for n, d in self.delta.modules.items() if isinstance(d, ExpertsDelta))

    @property
    def layer_modules(self) -> list[str]:
        """The layers the pack edits (PEFT ``target_modules``)."""
        return sorted(n for n, d in self.delta.modules.items() if not isinstance(d, ExpertsDelta))

    def lora_config(self):
        """A PEFT ``peft.LoraConfig`` whose LoRA layers reproduce the delta exactly (scaling alpha/r = 1).

        ``base_model_name_or_path`` is the base's Hub id where it has one (a built-in's upstream repository),
        else its portable id: never a local path.
        """

        stored = self.stored_factors()
        ranks = {name: d.rank for name, d in stored.items() if name not in self.stacked_modules}
        # With stacked experts every one shares ``r``; layers keep their own rank through the patterns.
        first = stored[self.stacked_modules[0]].rank if self.stacked_modules else ranks[self.modules[0]]
        return peft.LoraConfig(
            r=first,
            lora_alpha=first,
            rank_pattern={re.escape(n): r for n, r in ranks.items()},
            alpha_pattern={re.escape(n): r for n, r in ranks.items()},
            target_modules=self.layer_modules,
            target_parameters=self.stacked_modules or None,
            lora_dropout=0.0,
            bias="none",
            fan_in_fan_out=self.fan_in_fan_out,
            task_type="CAUSAL_LM",
            base_model_name_or_path=self.base.peft_name,
            revision=self.base.revision if self.base.hub_id == self.base.id else None,
            inference_mode=True,
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA weights under PEFT's saved key names (no adapter name, as ``save_pretrained`` writes them)."""
        return lora_state_dict(self.stored_factors())

    # ------------------------------------------------------------------------------------------ manifest
    def payload_manifest(self) -> dict[str, Any]:
        return {
            "delta": {
                "form": "lora",
                "content": self.delta_content,
                "fan_in_fan_out": self.fan_in_fan_out,
                "modules": {n: {"rank": d.rank, "shape": [d.B.shape[0], d.A.shape[1]],
                                "form": "dense" if stored_dense(d) else "lora",
                                **({"experts": d.experts, "edited_experts": d.edited()}
                                   if isinstance(d, ExpertsDelta) else {})}
                            for n, d in self.stored_factors().items()},
                "state": sorted(self.delta.state) or None,
            },
        }

    # ------------------------------------------------------------------------------------------ disk
    def write_payload(self, directory: Path) -> None:
        write_safetensors(self.adapter_state_dict(), directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        if self.delta.state:
            write_safetensors({k: v.detach().float().contiguous().cpu() for k, v in self.delta.state.items()},
                              directory / STATE)
        self.lora_config().save_pretrained(str(directory))

    @classmethod
    def from_manifest(cls, directory: Path, manifest: dict[str, Any]) -> "EditPack":
        described = section(manifest, "delta", directory)
        modules = described.get("modules")
        if not isinstance(modules, dict) or not modules:
            raise PackFormatError(f"{directory / MANIFEST}: delta.modules must list the edited modules")
        weights = directory / ADAPTER_WEIGHTS
        state = read_safetensors(weights)
        # A stacked experts parameter's LoRA sits on the module that owns it (``…experts``): the manifest says
        # which parameter, and over how many experts.
        stacked = {name.rpartition(".")[0]: (name, entry["experts"]) for name, entry in modules.items()
                   if isinstance(entry, dict) and isinstance(entry.get("experts"), int)}
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            match = ADAPTER_KEY.match(key)
            if not match:
                raise PackFormatError(f"{weights}: unexpected tensor {key!r}")
            module = stacked[match["module"]][0] if match["module"] in stacked else match["module"]
            factors.setdefault(module, {})[match["factor"]] = tensor
        delta = WeightDelta()
        for module, pair in factors.items():
            if set(pair) != {"A", "B"}:
                raise PackFormatError(f"{weights}: module {module} lacks lora_A or lora_B")
            if not all(t.ndim == 2 and t.is_floating_point() for t in pair.values()):
                raise PackFormatError(f"{weights}: the factors of {module} are not floating-point matrices")
            bad = [f"lora_{k}" for k, t in sorted(pair.items()) if not torch.isfinite(t).all()]
            if bad:
                raise PackFormatError(f"{weights}: {module} {' and '.join(bad)} hold NaN or infinite values")
            try:
                experts = next((n for name, n in stacked.values() if name == module), None)
                delta.modules[module] = (ExpertsDelta(B=pair["B"].float(), A=pair["A"].float(), experts=experts)
                                         if experts else LowRankDelta(B=pair["B"].float(), A=pair["A"].float()))
            except ValueError as exc:
                raise PackFormatError(f"{weights}: {module}: {exc}") from None
        if sorted(delta.modules) != sorted(modules):
            raise PackFormatError(f"{weights}: adapter modules {sorted(delta.modules)} differ from those the manifest "
                                  f"lists {sorted(modules)}")
        for module, entry in modules.items():
            d = delta.modules[module]
            found = {"rank": d.rank, "shape": [d.B.shape[0], d.A.shape[1]]}
            if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in found.items()):
                raise PackFormatError(f"{directory / MANIFEST}: delta.modules[{module!r}] says {entry!r}, the adapter "
                                      f"holds rank {found['rank']}, shape {found['shape']}")
        content = adapter_content_id(state)
        if described.get("content") != content:
            raise PackFormatError(f"{weights}: its content {content[:19]}… is not the delta.content the manifest "
                                  f"records ({str(described.get('content'))[:19]}…)")
        fan_in_fan_out = bool(described.get("fan_in_fan_out", False))
        if described.get("state"):
            if STATE not in (manifest.get("files") or {}):
                raise PackFormatError(f"{directory}: the manifest lists method state but not {STATE}")
            delta.state = read_safetensors(directory / STATE)
        pack = cls(**cls.header_fields(directory, manifest), delta=delta, fan_in_fan_out=fan_in_fan_out)
        check_adapter_config(directory, pack)
        check_delta_scale(pack, pack.base.norms or {}, "as the manifest records it")
        return pack


def adapter_content_id(state: dict[str, torch.Tensor]) -> str:
    """The content hash of an adapter state dict (module names, shapes and float32 factors)."""
    return content_digest(
        part for key, tensor in sorted(state.items())
        for part in (key.encode() + b"\0" + str(tuple(tensor.shape)).encode(),
                     tensor.detach().float().contiguous().cpu().numpy().tobytes())
    )


def check_adapter_config(directory: Path, pack: EditPack) -> None:
    """``adapter_config.json`` must be what PEFT needs to load exactly the pack's tensors with scaling 1."""
    path = directory / ADAPTER_CONFIG
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackFormatError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(found, dict):
        raise PackFormatError(f"{path} is not a PEFT adapter configuration (expected an object)")
    if found.get("peft_type") not in ("LORA", None):
        raise PackFormatError(f"{path}: peft_type is {found.get('peft_type')!r}, an edit pack is a LORA adapter")
    ranks = {n: d.rank for n, d in pack.stored_factors().items()}
    scale = {}
    for module, rank in ranks.items():
        r = _pattern_value(found.get("rank_pattern"), module, found.get("r"))
        alpha = _pattern_value(found.get("alpha_pattern"), module, found.get("lora_alpha"))
        if r != rank:
            raise PackFormatError(f"{path}: rank of {module} is {r!r}, the adapter's tensors have rank {rank}; PEFT "
                                  "could not load this pack")
        scale[module] = alpha / r if isinstance(alpha, (int, float)) and r else None
    wrong = sorted(m for m, s in scale.items() if s != 1)
    if wrong:
        raise PackFormatError(f"{path}: lora_alpha / r of {', '.join(wrong)} is not 1, so PEFT would scale the delta")
    targets = found.get("target_modules")
    targets = [targets] if isinstance(targets, str) else sorted(targets or [])
    if targets != pack.layer_modules:
        raise PackFormatError(f"{path}: target_modules {targets} are not the pack's modules {pack.layer_modules}")
    parameters = sorted(found.get("target_parameters") or [])
    if parameters != pack.stacked_modules:
        raise PackFormatError(f"{path}: target_parameters {parameters} are not the pack's stacked experts "
                              f"{pack.stacked_modules}")
    if bool(found.get("fan_in_fan_out", False)) != pack.fan_in_fan_out:
        raise PackFormatError(f"{path}: fan_in_fan_out disagrees with the manifest")
    if found.get("use_dora") or found.get("use_rslora") or found.get("bias", "none") != "none":
        raise PackFormatError(f"{path}: DoRA, rsLoRA and biases change what PEFT computes; an edit pack uses none")


def _pattern_value(pattern: Any, module: str, default: Any) -> Any:
    """The value PEFT takes for ``module`` from a rank/alpha pattern (keys are regexes matched at the end)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
