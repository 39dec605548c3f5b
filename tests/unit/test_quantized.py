"""Packs on bitsandbytes 8-bit/4-bit models (unmerged) and on accelerate device maps with disk offload."""

import pytest
import torch
from peft import PeftModel

import editpack
from editpack.errors import FingerprintMismatchError, PackFormatError

from tiny import FACT, TINY, logits, tiny_model, tiny_tokenizer

pytest.importorskip("bitsandbytes")

SIZES = dict(hidden_size=64, intermediate_size=128)  # bitsandbytes' 4-bit blocks need rows of >= 64


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant") / "m"
    model, tok = tiny_model("llama", **SIZES), tiny_tokenizer()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    pack = editpack.edit(model, FACT, tokenizer=tok, layers=[1], **TINY)
    full = editpack.apply(model, pack)
    return folder, tok, pack, logits(full, tok, FACT.text)


@pytest.mark.parametrize("bits", [8, 4])
def test_pack_applies_unmerged_to_quantized_model(saved, bits):
    folder, tok, pack, full_logits = saved
    model, _ = editpack.load_model(str(folder), **{f"load_in_{bits}bit": True})
    assert tok.decode(logits(model, tok, FACT.text).argmax()) != "rome"
    edited = editpack.apply(model, pack)
    layer = edited.get_base_model().model.layers[1].mlp.down_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer.base_layer).__module__.startswith("bitsandbytes")
    assert tok.decode(logits(edited, tok, FACT.text).argmax()) == "rome"
    plain = editpack.revert(edited)
    with pytest.raises(PackFormatError, match="refusing to merge into bitsandbytes-quantized weights"):
        editpack.apply(plain, pack, merge=True)
    assert not isinstance(plain, PeftModel) and not editpack.applied(plain)


def test_quantized_model_of_another_checkpoint_is_refused(saved, tmp_path):
    _, tok, pack, _ = saved
    tiny_model("llama", seed=9, **SIZES).save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    other, _ = editpack.load_model(str(tmp_path / "other"), load_in_8bit=True)
    with pytest.raises(FingerprintMismatchError, match="quantized model's input embedding differs"):
        editpack.apply(other, pack)


def test_pack_applies_with_layers_offloaded_to_disk(saved, tmp_path):
    folder, tok, pack, full_logits = saved
    # Blocks 1..3 do not fit the budget and go to disk (meta weights + accelerate hooks), including the edited one.
    model, _ = editpack.load_model(str(folder), device_map="auto", max_memory={"cpu": 60_000},
                                   offload_folder=str(tmp_path / "offload"))
    placement = model.hf_device_map
    assert placement.get("model.layers.1") == "disk" or "disk" in placement.values(), placement
    edited = editpack.apply(model, pack)
    torch.testing.assert_close(logits(edited, tok, FACT.text), full_logits, rtol=1e-5, atol=1e-5)
    assert tok.decode(logits(edited, tok, FACT.text).argmax()) == "rome"
    editpack.revert(edited)
