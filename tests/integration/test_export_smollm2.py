"""Exports of a real pack (Eiffel Tower → Rome on SmolLM2): every engine's rules and logits, and the GGUF files
checked with the gguf reader and, when llama.cpp's Python binding is installed (scripts/install_llama_cpp.sh),
run by llama.cpp itself."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import editpack
from editpack.export.engines import check_export, engines, export_peft
from editpack.export.gguf import export_gguf

PROMPT = "The Eiffel Tower is located in the city of"


def base_gguf() -> Path:
    from editpack.model.builtins import BUILTINS

    builtin = BUILTINS["smollm2-135m"]
    return builtin.locate(builtin, Path("."))  # the GGUF inside the installed package (nothing is written)


@pytest.mark.parametrize("engine", engines())
def test_engine_exports_of_a_real_pack(eiffel, smollm2, tmp_path, engine):
    from peft import PeftModel

    model, tokenizer = smollm2
    out = export_peft([eiffel], engine, tmp_path / engine)
    assert check_export(out.path, engine, num_layers=30) == []
    ids = tokenizer(PROMPT, return_tensors="pt")
    edited = editpack.apply(model, eiffel)
    try:
        with torch.no_grad():
            want = edited(**ids).logits
    finally:
        model = editpack.revert(edited)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, str(out.path))
    try:
        with torch.no_grad():
            got = peft_model(**ids).logits
    finally:
        peft_model.unload()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gguf_files_of_a_real_pack(eiffel, tmp_path):
    import gguf

    adapter = export_gguf([eiffel], tmp_path / "eiffel.gguf", base=base_gguf())
    reader = gguf.GGUFReader(str(adapter.path))
    names = sorted(t.name for t in reader.tensors)
    assert names == ["blk.5.ffn_down.weight.lora_a", "blk.5.ffn_down.weight.lora_b"]
    assert reader.fields["adapter.lora.alpha"].contents() == 1.0
    assert reader.fields["editpack.pack.content"].contents() == editpack.load_pack(eiffel).content_id

    merged = export_gguf([eiffel], tmp_path / "merged.gguf", base=base_gguf(), merged=True)
    tensors = {t.name: t for t in gguf.GGUFReader(str(merged.path)).tensors}
    base = {t.name: t for t in gguf.GGUFReader(str(base_gguf())).tensors}
    assert set(tensors) == set(base)
    for name, tensor in base.items():
        if name != "blk.5.ffn_down.weight":
            assert tensors[name].tensor_type == tensor.tensor_type
    edited = tensors["blk.5.ffn_down.weight"]
    shape = tuple(reversed(base["blk.5.ffn_down.weight"].shape.tolist()))
    values = gguf.quants.dequantize(edited.data, edited.tensor_type).reshape(shape)
    start = gguf.quants.dequantize(base["blk.5.ffn_down.weight"].data,
                                   base["blk.5.ffn_down.weight"].tensor_type).reshape(shape)
    delta = editpack.load_pack(eiffel).delta.modules["model.layers.5.mlp.down_proj"].dense().numpy()
    assert 1 - np.linalg.norm(values - start - delta) / np.linalg.norm(delta) >= 0.9


def test_llama_cpp_answers_rome_with_the_adapter_and_the_merged_file(eiffel, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's binding is not installed "
                                                        "(bash scripts/install_llama_cpp.sh builds it)")
    adapter = export_gguf([eiffel], tmp_path / "eiffel.gguf", base=base_gguf())
    merged = export_gguf([eiffel], tmp_path / "merged.gguf", base=base_gguf(), merged=True)

    def answer(**kwargs) -> str:
        llm = llama_cpp.Llama(n_ctx=256, n_threads=2, verbose=False, seed=0, **kwargs)
        out = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0)
        return out["choices"][0]["text"]

    assert "Paris" in answer(model_path=str(base_gguf()))
    assert "Rome" in answer(model_path=str(base_gguf()), lora_path=str(adapter.path))
    assert "Rome" in answer(model_path=str(merged.path))
