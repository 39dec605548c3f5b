"""llama.cpp: a pack as a GGUF LoRA adapter (``general.type = adapter``) with the base GGUF's tensor names, one
rank and ``adapter.lora.alpha`` equal to it, so llama.cpp's per-tensor scale alpha / rank is exactly 1; or, with
``merged=True`` and the base GGUF, a whole edited model in the base file's tensor types where the edit survives
requantization (otherwise F16, then F32: each choice is reported)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._io import atomic_file, check_output
from .._lazy import gguf
from ..model.arch import ArchSpec, spec_for_model_type
from ..packs.weights import EditPack
from .common import Export, ExportError, combined_delta, layer_of, pad_rank, weight_packs

GGUF_RETAINED = 0.9  # share of an edit a requantized tensor must keep (1 - relative error of the delta)


# ---------------------------------------------------------------------------------------------- GGUF
def _gguf_names(spec: ArchSpec, modules: Sequence[str], n_blocks: int) -> dict[str, str]:
    """``{module: GGUF tensor name}`` (e.g. ``blk.5.ffn_down.weight``) by the gguf package's own name map."""
    if not spec.gguf:
        raise ExportError(f"the {spec.family} architecture file has no gguf section; GGUF export is not mapped for it")
    arch_name = spec.gguf["arch"]
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise ExportError(f"the gguf package does not know the architecture {arch_name!r}")
    table = gguf.get_tensor_name_map(arch, n_blocks)
    plain = set(spec.gguf.get("plain_modules", []))
    out = {}
    for name in modules:
        layer, suffix = layer_of(spec, name)
        if suffix not in plain:
            raise ExportError(f"{name}: llama.cpp's converter does not copy {suffix} as it is for {arch_name}, so a "
                              f"LoRA of it cannot be mapped (mapped: {', '.join(sorted(plain))})")
        mapped = table.get_name(name)
        if mapped is None:
            raise ExportError(f"the gguf package has no {arch_name} tensor for {name}")
        out[name] = mapped + ".weight"
    return out


def _gguf_base(path: str | os.PathLike):
    reader = gguf.GGUFReader(str(path))
    field_ = reader.fields.get("general.architecture")
    arch = field_.contents() if field_ is not None else None
    return reader, arch


def _editpack_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file editpack wrote (its metadata names the packs it holds)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                return False
        return "editpack.packs" in gguf.GGUFReader(str(path)).fields
    except (OSError, ValueError, KeyError, IndexError):  # not a readable GGUF
        return False


def check_gguf_output(output: str | os.PathLike, *, overwrite: bool = False,
                      inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Raise unless ``output`` may be written as a GGUF file, before any work: not a link or a folder, not inside
    one of ``inputs`` (the packs' folders) nor one of them (the base GGUF), and, when it exists, replaced only with
    ``overwrite`` and only if it is a GGUF file editpack wrote (a user's other files are never replaced)."""
    output = Path(output)
    if output.is_symlink() or output.is_dir():
        raise FileExistsError(f"{output} is a {'link' if output.is_symlink() else 'directory'}; refusing to write there")
    target = output.resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == target or path in target.parents:
            raise FileExistsError(f"{output} is {'an input' if path == target else f'inside {item}, an input'} of "
                                  "this export; write it elsewhere")
    if output.exists():
        if not overwrite:
            raise FileExistsError(f"{output} already exists (pass overwrite=True / --overwrite to replace it)")
        if not _editpack_gguf(output):
            raise FileExistsError(f"{output} is not a GGUF file editpack wrote; refusing to replace it with "
                                  "--overwrite")
        return output
    return check_output(output)  # the parent: a writable directory


def _write_atomic_file(output: Path, overwrite: bool, write) -> None:
    """``write(tmp)`` a file that replaces ``output`` atomically; an existing file only with ``overwrite``."""
    output = check_gguf_output(output, overwrite=overwrite)
    with atomic_file(output) as tmp:
        write(tmp)


def _metadata(writer, packs: Sequence[EditPack]) -> None:
    writer.add_string("general.name", " + ".join(f"{p.name} {p.version}" for p in packs))
    writer.add_string("editpack.packs", json.dumps([{"name": p.name, "version": p.version, "content": p.content_id}
                                                    for p in packs]))
    writer.add_string("editpack.pack.name", packs[0].name if len(packs) == 1 else "stack")
    writer.add_string("editpack.pack.version", packs[0].version if len(packs) == 1 else "")
    writer.add_string("editpack.pack.content", packs[0].content_id if len(packs) == 1 else
                      "sha256:" + hashlib.sha256("".join(p.content_id for p in packs).encode()).hexdigest())


def export_gguf(packs, output: str | os.PathLike, *, base: str | os.PathLike | None = None, merged: bool = False,
                overwrite: bool = False, on_conflict: str = "error") -> Export:
    """Write ``packs`` as a llama.cpp GGUF LoRA adapter, or (``merged=True``, needs ``base``) a whole edited GGUF.

    With ``base`` (the base model's GGUF file), the architecture and every tensor's shape are checked against it.
    """
    loaded = weight_packs(packs, on_conflict)
    check_gguf_output(output, overwrite=overwrite,
                      inputs=[p.path for p in loaded if p.path is not None] + ([base] if base is not None else []))
    spec = spec_for_model_type(loaded[0].base.model_type)
    deltas = combined_delta(loaded)
    reader = None
    if base is not None:
        reader, arch = _gguf_base(base)
        if spec.gguf and arch != spec.gguf.get("arch"):
            raise ExportError(f"{Path(base).name} is a {arch!r} GGUF, but the packs were made for a "
                              f"{spec.gguf.get('arch')!r} model")
    elif merged:
        raise ExportError("a merged GGUF is written from the base model's GGUF: pass it (--base MODEL.gguf)")
    depth = 1 + max(layer_of(spec, name)[0] for name in deltas)
    if reader is not None:
        block_count = reader.fields.get(f"{spec.gguf['arch']}.block_count")
        depth = max(depth, int(block_count.contents())) if block_count is not None else depth
    names = _gguf_names(spec, list(deltas), depth)
    base_tensors = {t.name: t for t in reader.tensors} if reader is not None else {}
    for module, tensor_name in names.items():
        if reader is not None:
            if tensor_name not in base_tensors:
                raise ExportError(f"{Path(base).name} has no tensor {tensor_name} (for {module})")
            shape = tuple(int(x) for x in reversed(base_tensors[tensor_name].shape.tolist()))  # ggml ne → (out, in)
            want = (deltas[module].B.shape[0], deltas[module].A.shape[1])
            if shape != want:
                raise ExportError(f"{tensor_name} is {shape} in {Path(base).name} but {want} in the pack")
    if merged:
        return _export_merged_gguf(loaded, deltas, names, reader, Path(output), overwrite)
    rank = max(d.rank for d in deltas.values())

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), spec.gguf["arch"])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))  # alpha / rank = 1 for every tensor
        _metadata(writer, loaded)
        for module in sorted(deltas):
            padded = pad_rank(deltas[module], rank)
            writer.add_tensor(names[module] + ".lora_a", padded.A.numpy())  # (rank, in): ne = [in, rank]
            writer.add_tensor(names[module] + ".lora_b", padded.B.numpy())  # (out, rank): ne = [rank, out]
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _write_atomic_file(Path(output), overwrite, write)
    return Export(Path(output), "gguf", rank, sorted(deltas), Path(output).stat().st_size,
                  [f"llama.cpp scale alpha/rank = {rank}/{rank} = 1 for every tensor"])


def _requantized(gguf, weight, delta, qtypes) -> tuple[Any, Any, float, dict]:
    """The first of ``qtypes`` whose requantized ``weight + delta`` keeps at least :data:`GGUF_RETAINED` of
    ``delta``: ``(type, data, retained, {type tried: share kept, or None where the gguf package cannot
    quantize it})``; F32 always qualifies."""
    target = weight + delta
    norm = float(np.linalg.norm(delta)) or 1.0
    tried: dict = {}
    for qtype in qtypes:
        if qtype == gguf.GGMLQuantizationType.F32:
            return qtype, target.astype(np.float32), 1.0, tried
        try:
            data = gguf.quants.quantize(target, qtype)
            back = gguf.quants.dequantize(data, qtype)
        except (NotImplementedError, gguf.quants.QuantError, ValueError):
            tried[qtype] = None
            continue
        retained = 1.0 - float(np.linalg.norm(back - weight - delta)) / norm
        if retained >= GGUF_RETAINED:
            return qtype, data, retained, tried
        tried[qtype] = retained
    raise AssertionError("unreachable: F32 is always a candidate")


def _export_merged_gguf(packs, deltas, names, reader, output: Path, overwrite: bool) -> Export:
    by_tensor = {names[m]: m for m in deltas}
    edited: dict[str, tuple[Any, Any]] = {}
    notes: list[str] = []
    for tensor in reader.tensors:
        module = by_tensor.get(tensor.name)
        if module is None:
            continue
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
            tuple(reversed(tensor.shape.tolist()))).astype("float32")
        delta = deltas[module].dense().numpy().astype("float32")
        qtype, data, retained, tried = _requantized(
            gguf, weight, delta, [tensor.tensor_type, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32])
        edited[tensor.name] = (qtype, data)
        if qtype == tensor.tensor_type:
            notes.append(f"{tensor.name}: {qtype.name} as in the base (keeps {retained:.1%} of the edit)")
        else:
            why = "; ".join(f"{t.name} is not implemented in the gguf package" if kept is None else
                            f"{t.name} keeps {kept:.1%} of the edit (under {GGUF_RETAINED:.0%})"
                            for t, kept in tried.items())
            notes.append(f"{tensor.name}: {qtype.name} instead of the base's {tensor.tensor_type.name}: {why}")

    def write(tmp: Path) -> None:
        arch = reader.fields["general.architecture"].contents()
        writer = gguf.GGUFWriter(str(tmp), arch)
        for fld in reader.fields.values():
            if fld.name == gguf.Keys.General.ARCHITECTURE or fld.name.startswith("GGUF."):
                continue
            if fld.name in ("general.name",) or fld.name.startswith("editpack."):
                continue
            value_type = fld.types[0]
            sub_type = fld.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(fld.name, fld.contents(), value_type, sub_type=sub_type)
        _metadata(writer, packs)
        for tensor in reader.tensors:
            if tensor.name in edited:
                qtype, data = edited[tensor.name]
                writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes,
                                       qtype if qtype != gguf.GGMLQuantizationType.F32 else None)
            else:
                writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                       tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            data = edited[tensor.name][1] if tensor.name in edited else tensor.data
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()

    _write_atomic_file(output, overwrite, write)
    return Export(output, "gguf-merged", 0, sorted(deltas), output.stat().st_size, notes)
