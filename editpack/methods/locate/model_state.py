"""The model while an edit is computed: its head's logits, the precision and attention implementation the value
optimisation runs in, gradients off, and updates added and taken off exactly."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ...model.arch import ArchSpec, get_module
from ...model.fingerprint import edited_layer, weight_of
from ...model.generation import model_device


def head_logits(model, spec: ArchSpec, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (float32) for final-norm outputs ``hidden``, as the model's own head computes them (the family's
    logit scale, ``spec.logits``, and soft-capping included)."""
    logits = get_module(model, spec.lm_head)(hidden).float()
    if "multiply_by" in spec.logits:
        logits = logits * float(getattr(model.config, spec.logits["multiply_by"]))
    if "divide_by" in spec.logits:
        logits = logits / float(getattr(model.config, spec.logits["divide_by"]))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


_OPT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_optimize_dtype(name: str, device: torch.device) -> str:
    """``"auto"`` → ``"bfloat16"`` where ``device`` has fast bf16 arithmetic, else ``"float32"``; others as given."""
    if name != "auto":
        if name not in _OPT_DTYPES:
            raise ValueError(f"optimize_dtype must be auto or one of {', '.join(_OPT_DTYPES)}, not {name!r}")
        return name
    device = torch.device(device)
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":  # oneDNN's check: AVX-512 BF16 or AMX
        fast = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    else:
        fast = False
    return "bfloat16" if fast else "float32"


@contextlib.contextmanager
def attention_for_gradients(model: torch.nn.Module) -> Iterator[None]:
    """On a CPU, run attention with the plain matmul ("eager") implementation for the duration.

    PyTorch's CPU flash-attention backward is slow (a large share of each step); the matmul form gives the same
    values and a fast backward. GPUs keep the model's own implementation.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if model_device(model).type != "cpu" or current in (None, "eager") or setter is None:
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(current)


@contextlib.contextmanager
def weights_in(model: torch.nn.Module, dtype_name: str, spec: ArchSpec) -> Iterator[None]:
    """Run with the decoder blocks' and the LM head's floating-point weights cast to ``dtype_name``; originals
    put back after.

    The original tensors are kept by reference and restored as they were (no round trip), so the model's
    weights afterwards are bit for bit what they were before. The head is cast too: a batch of facts asks for
    logits at hundreds of positions, and over a vocabulary of 50k–128k that product costs as much as the blocks.
    (A head tied to the input embedding is cast once, with it; the final norm keeps its own dtype.)
    """
    if dtype_name not in _OPT_DTYPES:
        raise ValueError(f"optimize_dtype must be one of {', '.join(_OPT_DTYPES)}, not {dtype_name!r}")
    dtype = _OPT_DTYPES[dtype_name]
    saved = []
    blocks = get_module(model, spec.blocks)
    head = get_module(model, spec.lm_head)
    tensors = list(blocks.parameters()) + list(blocks.buffers()) + list(head.parameters())
    for tensor in {id(t): t for t in tensors}.values():
        if tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) and tensor.dtype != dtype:
            saved.append((tensor, tensor.data))
    if not saved:
        yield
        return

    def to(value, target):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if value.dtype == target:
                return value
            # An additive mask holds float32's minimum, which rounds to -inf in bf16: a fully masked row (left
            # padding) would then softmax to NaN in eager attention. Clamp to the target's finite range.
            limits = torch.finfo(target)
            if limits.max < torch.finfo(value.dtype).max:
                value = value.clamp(limits.min, limits.max)
            return value.to(target)
        if isinstance(value, (tuple, list)):
            return type(value)(to(v, target) for v in value)
        return value

    def into_blocks(_module, args, kwargs):  # hidden states, rotary tables, float masks
        return to(args, dtype), {k: to(v, dtype) for k, v in kwargs.items()}

    final_norm = get_module(model, spec.final_norm)
    out_dtype = saved[0][1].dtype

    def out_of_blocks(_module, args, kwargs):
        return to(args, out_dtype), kwargs

    handles = [block.register_forward_pre_hook(into_blocks, with_kwargs=True) for block in blocks]
    handles.append(final_norm.register_forward_pre_hook(out_of_blocks, with_kwargs=True))
    handles.append(head.register_forward_pre_hook(into_blocks, with_kwargs=True))
    handles.append(head.register_forward_hook(lambda _module, _args, output: to(output, out_dtype)))
    cast: dict[int, torch.Tensor] = {}
    try:
        for tensor, data in saved:
            if id(data) not in cast:  # tied weights share one tensor: cast it once
                cast[id(data)] = data.to(dtype)
            tensor.data = cast[id(data)]
        yield
    finally:
        for tensor, data in saved:
            tensor.data = data
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


@contextlib.contextmanager
def applied_updates(model, spec: ArchSpec) -> Iterator[dict[str, torch.Tensor]]:
    """Weights changed inside the block (``add_update``) are restored exactly on exit."""
    originals: dict[str, torch.Tensor] = {}
    try:
        yield originals
    finally:
        with torch.no_grad():
            for name, tensor in originals.items():
                weight_of(model, name).copy_(tensor)


@torch.no_grad()
def add_update(model, spec: ArchSpec, name: str, dense: torch.Tensor, originals: dict[str, torch.Tensor]) -> None:
    """Add ``dense`` (``(out, in)``; ``(experts, out, in)`` for a stacked experts parameter) to the weight of
    ``name`` now, keeping the original in ``originals``."""
    layer, attribute = edited_layer(model, name)
    weight = getattr(layer, attribute)
    originals.setdefault(name, weight.detach().clone())
    update = dense.to(device=weight.device, dtype=weight.dtype)
    if update.dim() == 3:  # stacked experts, stored (experts, in, out) where the module says it is transposed
        weight += update.transpose(1, 2) if getattr(layer, "is_transposed", False) else update
    else:
        weight += update.T if spec.mlp_transposed else update
