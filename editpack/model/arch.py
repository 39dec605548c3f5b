"""Architecture specs: where a model family keeps its blocks, MLPs, norms and head, as data.

Each family is one JSON file in the ``editpack.adapters`` package data (the repository's ``adapters/`` folder).
A spec is chosen by the model config's ``model_type``; nothing here tests model names. Module paths are
templates in which ``{}`` stands for the layer index. ``layer_roles`` says where the layers that methods edit
lie: each method declares a role (``critical``: the layer(s) a single-layer method such as ROME edits; ``run``:
a run of consecutive layers (LoRA, MEND); ``spread``: the layers MEMIT-style methods spread an update over (the
``run`` where a file leaves it out); ``late``: the one layer a codebook wraps (GRACE); ``tail``: the last MLPs a
gradient-based lifelong method edits (UltraEdit)), and the file places each
role as integers (a layer index) or floats in ``(0, 1)`` (a fraction of the model's depth, rounded down), so one
file serves every size of a family. ``method_settings`` holds a family's hyper-parameter defaults for a method.

Adding a family means adding ``adapters/<family>.json``; see ``docs/concepts/architectures.md``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import UnknownArchitectureError
from .fingerprint import unwrap

_REQUIRED = ("family", "model_types", "blocks", "mlp", "mlp_in", "mlp_out", "final_norm", "lm_head", "embed")


@dataclass(frozen=True)
class ArchSpec:
    """The module layout of one model family (see the module docstring)."""

    family: str
    model_types: tuple[str, ...]
    blocks: str
    mlp: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    final_norm: str
    lm_head: str
    embed: str
    attn: str | None = None
    #: The norm the MLP's output passes through before it joins the residual stream (Gemma 2/3's and OLMo 2's
    #: ``post_feedforward_layernorm``), a template like ``mlp``; absent where the output is added as it is. A
    #: method that spreads a residual change over MLP outputs (MEMIT, AlphaEdit) writes it through this norm.
    mlp_out_norm: str | None = None
    mlp_transposed: bool = False
    description: str = ""
    layer_roles: dict[str, dict[str, Any]] = field(default_factory=dict)
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: How llama.cpp names this family (``arch``, its ``general.architecture``) and which modules its converter
    #: copies without transforming them (``plain_modules``, suffixes after the layer): only those can be exported
    #: as GGUF LoRA tensors. Absent: no GGUF export.
    gguf: dict[str, Any] = field(default_factory=dict)
    #: What the family's forward does to the head's output besides soft-capping (``final_logit_softcapping``):
    #: ``{"multiply_by": "<config attribute>"}`` (Cohere's ``logit_scale``) or ``{"divide_by": …}`` (Granite's
    #: ``logits_scaling``), so methods that read logits from hidden states read what the model computes.
    logits: dict[str, str] = field(default_factory=dict)
    #: Mixture-of-Experts blocks (see docs/concepts/moe.md): ``module``, the template of the block's experts
    #: module (transformers' stacked experts: ``gate_up_proj`` and ``down_proj`` parameters of one leading
    #: expert dimension, called as ``experts(hidden, top_k_index, top_k_weights)``), and ``router``, the module
    #: that picks them (never edited). ``mlp`` is then the whole block, and ``mlp_out`` the stacked output
    #: parameter (``…experts.down_proj``) that locate-then-edit methods change, one expert slice at a time.
    experts: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "ArchSpec":
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise ValueError(f"architecture spec {source} lacks required keys: {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"architecture spec {source} has unknown keys: {', '.join(unknown)}")
        values = dict(data)
        values["model_types"] = tuple(values["model_types"])
        values["mlp_in"] = tuple(values["mlp_in"]) if isinstance(values["mlp_in"], list) else (values["mlp_in"],)
        experts = values.get("experts") or {}
        if experts and (set(experts) - {"module", "router"} or "module" not in experts
                        or not values["mlp_out"].startswith(experts["module"] + ".")):
            raise ValueError(f"architecture spec {source}: experts must name the experts module (and its router), "
                             "and mlp_out one of that module's parameters")
        return cls(**values)

    # -- module paths ---------------------------------------------------------------------------------------
    def block_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def mlp_name(self, layer: int) -> str:
        return self.mlp.format(layer)

    def mlp_out_name(self, layer: int) -> str:
        return self.mlp_out.format(layer)

    def mlp_out_norm_name(self, layer: int) -> str | None:
        return self.mlp_out_norm.format(layer) if self.mlp_out_norm else None

    def experts_name(self, layer: int) -> str | None:
        """The experts module of ``layer``'s Mixture-of-Experts block (``None`` for a dense family)."""
        return self.experts["module"].format(layer) if self.experts else None

    def wrap_name(self, layer: int) -> str:
        """The module a codebook wraps at ``layer`` (GRACE): the MLP output projection, or for a
        Mixture-of-Experts block the whole block (router and experts), so routing is never changed."""
        return self.mlp_name(layer) if self.experts else self.mlp_out_name(layer)

    def mlp_in_names(self, layer: int) -> list[str]:
        return [template.format(layer) for template in self.mlp_in]

    def block_of(self, name: str) -> int | None:
        """Index of the decoder block that module ``name`` lies in (``None`` if it is outside the blocks)."""
        prefix = f"{self.blocks}."
        if not name.startswith(prefix):
            return None
        index = name[len(prefix):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    # -- sizes and defaults ---------------------------------------------------------------------------------
    def num_layers(self, model: torch.nn.Module) -> int:
        return len(get_module(model, self.blocks))

    def role_layers(self, role: str, model: torch.nn.Module) -> list[int]:
        """The layers of ``role`` (``critical``, ``run``, …) on ``model``, resolving depth fractions."""
        entry = self.layer_roles.get(role, self.layer_roles.get(ROLE_FALLBACKS.get(role, "")))
        if entry is None or ("layers" not in entry and "start" not in entry):
            raise UnknownArchitectureError(
                f"the {self.family} spec does not place layer role {role!r}; pass layers=... or add "
                f'"layer_roles": {{"{role}": {{"layers": [...]}}}} to adapters/{self.family}.json'
            )
        depth = self.num_layers(model)
        if "start" in entry:  # a run of consecutive layers from a depth fraction (or index)
            start = entry["start"]
            first = int(start * depth) if isinstance(start, float) else int(start)
            first = min(first, max(depth - int(entry["count"]), 0))
            return list(range(first, min(first + int(entry["count"]), depth)))
        layers = []
        for value in entry["layers"]:
            index = int(value * depth) if isinstance(value, float) else int(value)
            if not 0 <= index < depth:
                raise ValueError(f"layer {value!r} of role {role!r} is outside 0..{depth - 1}")
            layers.append(index)
        return layers

    def method_defaults(self, method: str) -> dict[str, Any]:
        """Hyper-parameter defaults this family gives ``method`` (e.g. MEMIT's λ for Llama-like models)."""
        return dict(self.method_settings.get(method) or {})

    def weight_matrix(self, module: torch.nn.Module) -> torch.Tensor:
        """The module's weight as a ``(out_features, in_features)`` view (un-transposing GPT-2's Conv1D)."""
        weight = module.weight
        return weight.T if self.mlp_transposed else weight


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Return the submodule called ``name`` (dotted path), with an error that lists what exists nearby."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise UnknownArchitectureError(f"model {type(model).__name__} has no module {name!r}: {exc}") from None


@lru_cache(maxsize=None)
def _load_all() -> dict[str, ArchSpec]:
    by_type: dict[str, ArchSpec] = {}
    for entry in sorted(resources.files("editpack.adapters").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        spec = ArchSpec.from_dict(json.loads(entry.read_text(encoding="utf-8")), source=entry.name)
        for model_type in spec.model_types:
            if model_type in by_type:
                raise ValueError(f"model_type {model_type!r} is claimed by two specs: {by_type[model_type].family}, {spec.family}")
            by_type[model_type] = spec
    return by_type



ARCHITECTURES_ENV = "EDITPACK_ARCHITECTURES"
#: Where a spec given for one model (``load_model(arch=…)``, ``--arch FILE``) or inferred for it is kept on it.
_ON_MODEL = "_editpack_arch"
#: A role a file may leave out, and the role that places it then: ``spread``, the layers MEMIT and AlphaEdit spread
#: a residual over, is the ``run`` unless a family needs fewer (Gemma 3: one; see docs/concepts/architectures.md).
ROLE_FALLBACKS = {"spread": "run"}
#: The layer roles an inferred spec places (the shipped decoders' fractions of depth).
DEFAULT_ROLES = {"critical": {"layers": [0.17]}, "run": {"start": 0.12, "count": 5}, "late": {"layers": [0.85]},
                 "tail": {"start": 0.75, "count": 4}}
log = logging.getLogger(__name__)


def load_spec_file(path: str | os.PathLike) -> ArchSpec:
    """An architecture file of the user's (the shipped files' format), with a clear error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnknownArchitectureError(f"architecture file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnknownArchitectureError(f"architecture file {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UnknownArchitectureError(f"architecture file {path} must hold one JSON object")
    try:
        return ArchSpec.from_dict(data, source=path.name)
    except (TypeError, ValueError) as exc:
        raise UnknownArchitectureError(str(exc)) from None


def user_specs() -> dict[str, ArchSpec]:
    """The specs in ``$EDITPACK_ARCHITECTURES`` (a folder of JSON files), by model type; read on every call."""
    folder = os.environ.get(ARCHITECTURES_ENV)
    if not folder:
        return {}
    if not Path(folder).is_dir():
        raise UnknownArchitectureError(f"{ARCHITECTURES_ENV}={folder} is not a folder of architecture files")
    found: dict[str, ArchSpec] = {}
    for path in sorted(Path(folder).glob("*.json")):
        spec = load_spec_file(path)
        found.update({t: spec for t in spec.model_types})
    return found


def spec_for_model_type(model_type: str) -> ArchSpec:
    """The spec of a model type: the user's (``$EDITPACK_ARCHITECTURES``) before the shipped files."""
    user = user_specs()
    if model_type in user:
        return user[model_type]
    specs = _load_all()
    if model_type not in specs:
        raise UnknownArchitectureError(
            f"no architecture spec for model_type {model_type!r} (known: {', '.join(sorted(specs))}). Describe it in "
            f"a JSON file listing \"{model_type}\" under model_types (`editpack arch --model M` prints what editpack "
            f"infers) and pass it with --arch FILE, or put it in ${ARCHITECTURES_ENV}; see "
            "docs/concepts/architectures.md"
        )
    return specs[model_type]


def use_spec(model: torch.nn.Module, spec: ArchSpec) -> None:
    """Make ``spec`` the one editpack uses for ``model`` (``load_model(arch=…)``, ``--arch FILE``)."""
    unwrap(model).__dict__[_ON_MODEL] = spec


def spec_for(model: torch.nn.Module) -> ArchSpec:
    """The spec for a transformers model (or a wrapper of one): the one given for it (``--arch``), else by
    ``config.model_type`` (the user's files, then the shipped ones), else inferred from its module tree
    (:func:`infer_spec`; said once, with how to pin it)."""
    base = unwrap(model)
    given = base.__dict__.get(_ON_MODEL)
    if given is not None:
        return given
    config = getattr(base, "config", None)
    if config is None:
        raise UnknownArchitectureError(f"{type(model).__name__} has no config; editpack needs a transformers model")
    try:
        return spec_for_model_type(config.model_type)
    except UnknownArchitectureError as unknown:
        try:
            spec = infer_spec(base)
        except UnknownArchitectureError as exc:
            raise UnknownArchitectureError(f"{unknown} Inferring it from the module tree did not work either: "
                                           f"{exc}") from None
    log.info("No architecture file for model_type %r: its layout was inferred from the module tree (blocks %s, "
             "MLP output %s). Pin it: `editpack arch --model M > %s.json`, then --arch %s.json (or put it in $%s).",
             config.model_type, spec.blocks, spec.mlp_out, config.model_type, config.model_type, ARCHITECTURES_ENV)
    use_spec(base, spec)
    return spec


def _linear_shape(module: torch.nn.Module) -> tuple[int, int, bool] | None:
    """``(out_features, in_features, transposed)`` of a linear layer (``nn.Linear``, GPT-2's ``Conv1D``, a PEFT or
    bitsandbytes wrapper of either), else ``None``."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, torch.nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")):
        return int(module.out_features), int(module.in_features), False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return int(module.nf), int(module.weight.shape[0]), True
    return None


def infer_spec(model: torch.nn.Module) -> ArchSpec:
    """A spec read off the model's module tree: the ``ModuleList`` of decoder blocks, in the first block the
    MLP's output projection (a linear layer from a width larger than the hidden size back to it) and its input
    projections (from the hidden size to that width, or twice it when fused), the norm after the blocks, the
    output head and the input embedding. Raises :class:`UnknownArchitectureError` saying what is missing (a
    Mixture-of-Experts block, whose experts are not linear layers, has no single MLP output projection)."""
    names = {id(m): n for n, m in model.named_modules()}
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) >= 2
             and len({type(c) for c in m}) == 1]
    if not lists:
        raise UnknownArchitectureError("no ModuleList of identical decoder blocks found")
    blocks_name, blocks = max(lists, key=lambda item: len(item[1]))
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None or id(embed) not in names or id(head) not in names:
        raise UnknownArchitectureError("the model's input embedding or output head is not one of its modules")
    hidden = hidden or embed.weight.shape[1]
    block = blocks[0]
    linears = {n: _linear_shape(m) for n, m in block.named_modules() if n and _linear_shape(m) is not None
               and "lora_" not in n and not n.endswith(".base_layer")}
    outs = [(n, shape) for n, shape in linears.items() if shape[0] == hidden and shape[1] > hidden]
    experts = _stacked_experts(block, hidden)
    if not outs and experts:
        return _moe_spec(model, blocks_name, block, experts, names, embed, head)
    if not outs:
        raise UnknownArchitectureError(
            f"the first block ({blocks_name}.0) has no linear layer from a wider width back to the hidden size "
            f"{hidden} (an MLP output projection); a Mixture-of-Experts block keeps its experts as other parameters")
    out_name, (_, width, transposed) = max(outs, key=lambda item: item[1][1])
    mlp_name = out_name.rpartition(".")[0]
    ins = [n for n, shape in linears.items() if n.rpartition(".")[0] == mlp_name and shape[1] == hidden
           and shape[0] in (width, 2 * width)]
    if not mlp_name or not ins:
        raise UnknownArchitectureError(f"{blocks_name}.0.{out_name} has no input projection beside it in one MLP")
    template = _template(blocks_name)
    out_norm = _norm_after(model, block, mlp_name)
    return ArchSpec(
        family=f"inferred-{model.config.model_type}", model_types=(model.config.model_type,),
        description=f"inferred by editpack from {type(model).__name__}'s module tree",
        blocks=blocks_name, mlp=template(mlp_name), mlp_in=tuple(template(n) for n in ins), mlp_out=template(out_name),
        attn=_attention(block, mlp_name, template), mlp_out_norm=template(out_norm) if out_norm else None,
        final_norm=_final_norm(model, blocks_name), lm_head=names[id(head)], embed=names[id(embed)],
        mlp_transposed=transposed, layer_roles=DEFAULT_ROLES)


def _template(blocks_name: str):
    """``name`` inside block ``{}`` (a module path template)."""
    return lambda name: f"{blocks_name}.{{}}.{name}"


def _final_norm(model: torch.nn.Module, blocks_name: str) -> str:
    """The last norm beside the block list (the norm after the blocks), or a clear error."""
    parent = blocks_name.rpartition(".")[0]
    norms = [n for n, m in model.named_modules() if n.rpartition(".")[0] == parent and n != blocks_name
             and ("norm" in type(m).__name__.lower() or "layernorm" in n.lower().replace("_", ""))]
    if not norms:
        raise UnknownArchitectureError(f"no norm after the blocks beside {blocks_name}")
    return norms[-1]


def _attention(block: torch.nn.Module, mlp_name: str, template) -> str | None:
    """The first of the block's children besides the MLP that holds linear layers (its attention)."""
    attn = [n for n, m in block.named_children() if n != mlp_name.split(".")[0] and any(
        _linear_shape(c) is not None for c in m.modules())]
    return template(attn[0]) if attn else None


def _stacked_experts(block: torch.nn.Module, hidden: int) -> str | None:
    """The name of the block's experts module in transformers' stacked form (a ``down_proj`` parameter of
    ``(experts, …)`` shape with ``hidden`` in it, beside ``gate_up_proj`` or ``up_proj``), else ``None``."""
    for name, module in block.named_modules():
        down = getattr(module, "down_proj", None)
        if (name and isinstance(down, torch.nn.Parameter) and down.dim() == 3 and hidden in down.shape[1:]
                and any(isinstance(getattr(module, p, None), torch.nn.Parameter) for p in ("gate_up_proj", "up_proj"))):
            return name
    return None


def _moe_spec(model, blocks_name: str, block, experts: str, names: dict, embed, head) -> ArchSpec:
    """An inferred spec for a block with stacked experts: the MoE block is ``mlp``, its router the sibling with a
    weight of ``(experts, hidden)`` shape."""
    mlp_name = experts.rpartition(".")[0]
    count = get_module(block, experts).down_proj.shape[0]
    mlp = get_module(block, mlp_name) if mlp_name else block
    routers = [n for n, m in mlp.named_children() if isinstance(getattr(m, "weight", None), torch.Tensor)
               and m.weight.dim() == 2 and m.weight.shape[0] == count]
    if not mlp_name or not routers:
        raise UnknownArchitectureError(f"{blocks_name}.0.{experts} holds stacked experts, but no router beside it")
    gated = "gate_up_proj" if isinstance(getattr(get_module(block, experts), "gate_up_proj", None),
                                         torch.nn.Parameter) else "up_proj"
    template = _template(blocks_name)
    return ArchSpec(
        family=f"inferred-{model.config.model_type}", model_types=(model.config.model_type,),
        description=f"inferred by editpack from {type(model).__name__}'s module tree (stacked experts)",
        blocks=blocks_name, mlp=template(mlp_name), mlp_in=(template(f"{experts}.{gated}"),),
        mlp_out=template(f"{experts}.down_proj"), attn=_attention(block, mlp_name, template),
        final_norm=_final_norm(model, blocks_name), lm_head=names[id(head)], embed=names[id(embed)],
        experts={"module": template(experts), "router": template(f"{mlp_name}.{routers[0]}")},
        layer_roles=DEFAULT_ROLES)


def _norm_after(model: torch.nn.Module, block: torch.nn.Module, mlp_name: str) -> str | None:
    """The block's norm-like child (a weight vector, not a linear layer; dropouts have no weights) that reads the
    MLP's output itself (a post-feed-forward norm), found by running the model on two tokens and watching which
    module receives the MLP's output tensor; ``None`` when none does, or when the model cannot run here (its
    weights not loaded)."""
    mlp = get_module(block, mlp_name)
    children = [(n, m) for n, m in block.named_children() if n != mlp_name.split(".")[0] and _linear_shape(m) is None
                and any(p.dim() == 1 for p in m.parameters(recurse=False))]
    seen: dict[str, Any] = {}
    hooks = [mlp.register_forward_hook(lambda _m, _i, out: seen.setdefault("mlp", out))]
    for name, child in children:
        hooks.append(child.register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, args[0] if args else None)))
    try:
        param = next(model.parameters())
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=param.device))
    except Exception as error:  # noqa: BLE001 - meta weights, a dispatched model without its devices: no norm known
        log.debug("could not run the model to find the MLP's output norm: %s", error)
        return None
    finally:
        for hook in hooks:
            hook.remove()
    out = seen.get("mlp")
    out = out[0] if isinstance(out, (tuple, list)) else out
    return next((name for name, _ in children if out is not None and seen.get(name) is out), None)


def spec_json(spec: ArchSpec) -> str:
    """``spec`` as an architecture file (the shipped files' format)."""
    data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items() if v not in ({}, None, "")}
    data["family"] = spec.family.removeprefix("inferred-")
    return json.dumps(data, indent=2) + "\n"
