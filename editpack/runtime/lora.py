"""A weight pack as a PEFT LoRA adapter on a model: the adapter added, its factors copied in, and real storage
for factors whose base layer accelerate offloaded."""

from __future__ import annotations

import torch

from .._lazy import peft
from ..errors import PackFormatError
from ..model.fingerprint import unwrap
from ..packs.weights import EditPack, adapter_module


def add_adapters(model: torch.nn.Module, packs: list[EditPack]):

    peft_model = model if isinstance(model, peft.PeftModel) else None
    for pack in packs:
        config = pack.lora_config()
        # PEFT names the base by the model it is put on (and warns when the pack's portable name differs).
        config.base_model_name_or_path = unwrap(model).__dict__.get("name_or_path") or None
        if peft_model is None:
            peft_model = peft.get_peft_model(model, config, adapter_name=pack.adapter_name)
        else:
            peft_model.add_adapter(pack.adapter_name, config)
        materialize_offloaded(peft_model, pack)
        load_factors(peft_model, pack)
    return peft_model


def load_factors(peft_model, pack: EditPack) -> None:
    """Copy the pack's factors into its LoRA layers.

    Equivalent to ``peft.set_peft_model_state_dict`` with the pack's adapter state dict, but without calling
    ``state_dict()`` on the whole model: bitsandbytes 0.50's 4-bit layers, once they have run on the CPU, undo
    their CPU weight packing in ``state_dict()`` and compute garbage afterwards.
    """
    base = unwrap(peft_model)
    with torch.no_grad():
        for module_name, delta in pack.stored_factors().items():
            layer = base.get_submodule(adapter_module(module_name, delta))
            for factors, tensor in ((layer.lora_A, delta.A), (layer.lora_B, delta.B)):
                weight = factors[pack.adapter_name].weight
                if tuple(weight.shape) != tuple(tensor.shape):
                    raise PackFormatError(f"pack {pack.ref}: {module_name} factor is {tuple(tensor.shape)}, the "
                                          f"LoRA layer expects {tuple(weight.shape)}")
                weight.copy_(tensor.to(device=weight.device, dtype=weight.dtype))


def materialize_offloaded(peft_model, pack: EditPack) -> None:
    """Give LoRA factors real storage where accelerate offloaded the base layer.

    PEFT places an adapter on its base layer's device, which for a layer offloaded to CPU or disk is ``meta``.
    accelerate's hooks sit on each leaf layer (the wrapped ``base_layer`` keeps its own), so the small LoRA
    factors can simply live, unhooked, on the layer's execution device.
    """
    base = unwrap(peft_model)
    for module_name, delta in pack.stored_factors().items():
        layer = base.get_submodule(adapter_module(module_name, delta))
        for factors in (layer.lora_A, layer.lora_B):
            part = factors[pack.adapter_name]
            if any(p.is_meta for p in part.parameters()):
                part.to_empty(device=_execution_device(layer))


def _execution_device(layer: torch.nn.Module) -> torch.device:
    base = getattr(layer, "base_layer", layer)
    hook = getattr(base, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device) if not isinstance(hook.execution_device, int) else (
            torch.device("cuda", hook.execution_device))
    weight = next(base.parameters(recurse=False))
    return torch.device("cpu") if weight.device.type == "meta" else weight.device
