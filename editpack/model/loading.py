"""Loading models, in one place: built-in short names (:mod:`.builtins`), local folders, GGUF files and Hub ids,
in full precision, bitsandbytes 4/8-bit or placed by accelerate (``device_map``, ``max_memory``, offload)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._lazy import transformers
from ..errors import MissingPackageError, ModelNotFoundError
from .arch import ArchSpec, load_spec_file, use_spec
from .builtins import BUILTINS, DEFAULT_MODEL, ensure_builtin, ensure_gguf
from .quiet import log_once, quiet_progress

#: The precisions ``load_model(dtype=...)`` is offered with on the command line (it also takes the short aliases).
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class ModelRef:
    """What a loaded model is. ``id`` is what packs record (portable: a built-in name, a Hub id, or the name of a
    local folder or GGUF file, never its path); ``path`` is where this machine loads it from."""

    id: str
    path: str
    revision: str | None = None

    @property
    def hub(self) -> bool:
        """Loaded by Hub id (the id is the repository)."""
        return self.path == self.id


def resolve_model(name_or_path: str | None = None, revision: str | None = None) -> ModelRef:
    """Turn a user's model argument into a loadable folder or Hub id (converting built-ins/GGUF if needed)."""
    name = name_or_path or os.environ.get("EDITPACK_MODEL") or DEFAULT_MODEL
    if name in BUILTINS:
        return ModelRef(id=name, path=str(ensure_builtin(name)))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelRef(id=path.name, path=str(ensure_gguf(path)))
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelRef(id=path.resolve().name, path=str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelRef(id=ggufs[0].name, path=str(ensure_gguf(ggufs[0])))
        raise ModelNotFoundError(f"{path} is a folder but holds no config.json (nor exactly one .gguf file)")
    if path.is_file():
        raise ModelNotFoundError(f"{name} is a file but not a .gguf model; give a model folder (with config.json), a "
                                 f".gguf file, a built-in name ({', '.join(BUILTINS)}) or a Hub id")
    if path.suffix == ".gguf" or os.sep in name and not _looks_like_hub_id(name):
        raise ModelNotFoundError(f"no such model file or folder: {name}")
    if _looks_like_hub_id(name):
        return ModelRef(id=name, path=name, revision=revision)
    raise ModelNotFoundError(
        f"unknown model {name!r}: not a built-in ({', '.join(BUILTINS)}), a local folder, a .gguf file, or a Hub "
        "id of the form org/name"
    )


def local_model_path(name: str | None) -> Path | None:
    """Where model ``name`` lies on this machine, without loading or converting it: a built-in's converted folder,
    a local folder or file; ``None`` for a Hub id."""
    if name is None:
        return None
    if name in BUILTINS:
        return BUILTINS[name].cache_path()
    path = Path(name).expanduser()
    return path if path.exists() else None


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def quantization_config(load_in_4bit: bool = False, load_in_8bit: bool = False, compute_dtype: torch.dtype | None = None):
    """A transformers ``BitsAndBytesConfig`` for 4- or 8-bit loading (needs the ``quant`` extra)."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of 4-bit and 8-bit loading, not both")
    if not (load_in_4bit or load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingPackageError("4/8-bit loading needs bitsandbytes: pip install 'editpack[quant]'")

    if load_in_4bit:
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype or torch.float32)
    log_once("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")
    return transformers.BitsAndBytesConfig(load_in_8bit=True)


#: accelerate's named placement strategies (anything else is a device, or a mapping of modules to devices).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_placement(device_map: str | dict | None = None, max_memory: dict | None = None,
                    offload_folder: str | None = None) -> None:
    """Raise ``ValueError`` before a model is loaded when the placement cannot work here: a device this machine
    lacks (``cuda:7`` on a CPU build of torch), or ``max_memory`` / ``offload_folder`` without a ``device_map``
    (accelerate would ignore them)."""
    if device_map is None:
        given = [name for name, value in (("max_memory", max_memory), ("offload_folder", offload_folder)) if value]
        if given:
            raise ValueError(f"{' and '.join(given)} take{'s' if len(given) == 1 else ''} effect only with "
                             "device_map (e.g. auto); without it the whole model is loaded on one device")
        return
    names = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    for name in names:
        if name == "disk" or not isinstance(device_map, dict) and name in DEVICE_MAP_STRATEGIES:
            continue
        try:
            device = torch.device(f"cuda:{name}" if isinstance(name, int) or str(name).isdigit() else name)
        except (RuntimeError, TypeError):
            raise ValueError(f"device map {name!r} is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) nor a "
                             "device (cpu, cuda:0, …)") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if not count:
                raise ValueError(f"device map {name!r}: this torch sees no CUDA device (CPU build, or no GPU); use "
                                 "cpu or auto")
            if device.index is not None and device.index >= count:
                raise ValueError(f"device map {name!r}: this machine has {count} CUDA device(s), numbered 0 to "
                                 f"{count - 1}")
        elif device.type not in ("cpu", "meta") and not _backend_available(device.type):
            raise ValueError(f"device map {name!r}: no {device.type} device is available here")


def _backend_available(kind: str) -> bool:
    backend = getattr(torch, kind, None)
    return bool(backend is not None and getattr(backend, "is_available", lambda: False)())


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str | torch.dtype | None = "float32",
    device_map: str | dict | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    revision: str | None = None,
    arch: str | os.PathLike | ArchSpec | None = None,
):
    """Load a causal LM and its tokenizer.

    ``name_or_path`` is a built-in short name (``smollm2-135m``, the default; ``gemma3-270m``;
    ``qwen2.5-coder-1.5b``), a local transformers folder, a ``.gguf`` file, or a Hub id (when the Hub is
    reachable or the id is in the Hugging Face cache). ``dtype`` is ``"float32"`` (default; editing wants full
    precision), ``"bfloat16"``, ``"float16"``, ``"auto"`` or a torch dtype. ``device_map``/``max_memory``/
    ``offload_folder`` go to accelerate; ``load_in_4bit``/``load_in_8bit`` quantize with bitsandbytes.

    Returns ``(model, tokenizer)``; the model is in eval mode, ``model.editpack_ref`` says what was loaded and
    ``model.editpack_tokenizer`` is the tokenizer (so ``editpack.edit(model, facts)`` needs no other argument).
    The tokenizer always has a pad token (the EOS token when the model defines none). ``arch``: an architecture
    file (or :class:`~editpack.model.arch.ArchSpec`) editpack uses for this model instead of looking its family up.
    """

    check_placement(device_map, max_memory, offload_folder)
    spec = load_spec_file(arch) if isinstance(arch, (str, os.PathLike)) else arch  # checked before the load
    ref = resolve_model(name_or_path, revision)
    kwargs: dict[str, Any] = {}
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))} or auto")
        dtype = _DTYPES[dtype]
    if dtype is not None:
        kwargs["dtype"] = dtype
    quant = quantization_config(load_in_4bit, load_in_8bit, dtype if isinstance(dtype, torch.dtype) else None)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = offload_folder
    if ref.revision:
        kwargs["revision"] = ref.revision
    try:
        with quiet_progress():
            model = transformers.AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(ref.path, revision=ref.revision)
    except OSError as exc:
        raise ModelNotFoundError(f"could not load model {ref.id!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.editpack_ref = ref
    model.editpack_tokenizer = tokenizer
    if spec is not None:
        use_spec(model, spec)
    return model, tokenizer
