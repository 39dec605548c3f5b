import pytest
import torch

import json
from importlib import resources

from editpack.model.experts import down_weight, expert_inputs, experts_module
from editpack.model.arch import ArchSpec, get_module, spec_for, spec_for_model_type
from editpack.errors import UnknownArchitectureError

from tiny import tiny_model

#: Every model type the shipped architecture files claim.
ALL_TYPES = sorted({t for entry in resources.files("editpack.adapters").iterdir() if entry.name.endswith(".json")
                    for t in json.loads(entry.read_text(encoding="utf-8"))["model_types"]})


def test_required_families_are_covered():
    for model_type in ["llama", "mistral", "qwen2", "gemma3_text", "gpt2", "gptj", "gpt_neox"]:
        assert model_type in ALL_TYPES


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_spec_paths_resolve_and_shapes_match(model_type):
    model = tiny_model(model_type)
    spec = spec_for(model)
    config = model.config
    hidden, inner, depth = config.hidden_size, 64, config.num_hidden_layers
    assert spec.num_layers(model) == depth
    assert isinstance(get_module(model, spec.embed), torch.nn.Embedding)
    assert get_module(model, spec.lm_head).weight.shape[0] == config.vocab_size
    get_module(model, spec.final_norm)
    for layer in range(depth):
        get_module(model, spec.block_name(layer))
        get_module(model, spec.mlp_name(layer))
        if spec.experts:  # stacked experts: each expert's output projection maps its inner width back to hidden
            experts = experts_module(model, spec, layer)
            width = expert_inputs(experts, torch.zeros(1, hidden), 0).shape[1]
            assert tuple(down_weight(experts, 0).shape) == (hidden, width)
            get_module(model, spec.experts["router"].format(layer))
            continue
        out = spec.weight_matrix(get_module(model, spec.mlp_out_name(layer)))
        assert tuple(out.shape) == (hidden, inner), "mlp_out must map the MLP's inner width back to hidden"
        for name in spec.mlp_in_names(layer):
            rows, cols = spec.weight_matrix(get_module(model, name)).shape
            assert cols == hidden and rows in (inner, 2 * inner), "mlp_in maps hidden to the inner width (twice it fused)"
        if spec.attn:
            get_module(model, spec.attn.format(layer))


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_default_rome_layers_are_in_range(model_type):
    model = tiny_model(model_type)
    layers = layers_of("rome", model)
    assert layers and all(0 <= layer < model.config.num_hidden_layers for layer in layers)


def test_fraction_layers_scale_with_depth():
    deep = tiny_model("llama", num_hidden_layers=30)
    assert layers_of("rome", deep) == [int(0.17 * 30)]


def test_unknown_architecture_names_the_file_to_add():
    with pytest.raises(UnknownArchitectureError, match=r"--arch FILE, or put it in \$EDITPACK_ARCHITECTURES"):
        spec_for_model_type("bloom")


def test_unknown_layer_role_says_what_to_add():
    model = tiny_model("gpt2")
    with pytest.raises(UnknownArchitectureError, match="does not place layer role 'nosuch'.*adapters/gpt2.json"):
        spec_for(model).role_layers("nosuch", model)


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="lacks required keys"):
        ArchSpec.from_dict({"family": "x"})
    good = {k: "x" for k in ("family", "blocks", "mlp", "mlp_out", "final_norm", "lm_head", "embed")}
    good.update(model_types=["x"], mlp_in=["x"])
    with pytest.raises(ValueError, match="unknown keys: typo"):
        ArchSpec.from_dict({**good, "typo": 1})


def test_gpt2_weights_are_transposed():
    model = tiny_model("gpt2")
    spec = spec_for(model)
    module = get_module(model, spec.mlp_out_name(0))
    assert spec.mlp_transposed and module.weight.shape == (64, 32)


def test_methods_declare_a_layer_role_and_the_spec_places_it():
    from tiny import tiny_model

    model = tiny_model("llama", num_hidden_layers=30)
    spec = spec_for(model)
    assert layers_of("memit", model) == layers_of("alphaedit", model) == layers_of("lora", model) == [3, 4, 5, 6, 7]
    assert layers_of("rome", model) == layers_of("ft", model) == [5]
    assert spec.method_defaults("memit") == {"mom2_update_weight": 500}
    assert spec.method_defaults("rome") == {}
    short = tiny_model("llama", num_hidden_layers=4)
    assert layers_of("memit", short) == [0, 1, 2, 3]  # a run never leaves the model


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "olmo2", "exaone4", "glm4"])
def test_post_norm_families_spread_memit_over_the_critical_layer_and_name_their_norm(model_type):
    from tiny import tiny_model

    model = tiny_model(model_type, num_hidden_layers=30)
    spec = spec_for(model)
    assert layers_of("memit", model) == layers_of("alphaedit", model) == layers_of("rome", model) == [5]
    assert layers_of("lora", model) == [3, 4, 5, 6, 7]  # the run itself is unchanged
    norm = get_module(model, spec.mlp_out_norm_name(5))
    assert "norm" in type(norm).__name__.lower()  # the inferred layout finds the same one (test_families)


def test_a_spec_without_a_spread_role_spreads_over_its_run():
    spec = spec_for_model_type("llama")
    assert "spread" not in spec.layer_roles and spec.mlp_out_norm is None


def layers_of(method: str, model) -> list[int]:
    from editpack.methods import get_method

    return get_method(method)().default_layers(model, spec_for(model))
