import torch

from editpack.model.arch import spec_for
from editpack.model.nethook import Trace, TraceDict

from tiny import tiny_model


def _batch():
    return {"input_ids": torch.tensor([[1, 5, 9, 3]])}


def test_trace_reads_input_and_output_of_a_module():
    model = tiny_model("llama")
    name = spec_for(model).mlp_out_name(1)
    with Trace(model, name, retain_input=True, retain_output=True, detach=True) as tr:
        model(**_batch())
    module = model.get_submodule(name)
    assert tr.input.shape == (1, 4, 64)
    torch.testing.assert_close(tr.output, module(tr.input))


def test_edit_output_changes_the_logits_and_hooks_are_removed():
    model = tiny_model("gpt2")
    name = spec_for(model).mlp_out_name(0)
    base = model(**_batch()).logits

    def add_one(output, layer):
        assert layer == name
        return output + 1.0

    with Trace(model, name, edit_output=add_one):
        edited = model(**_batch()).logits
    assert not torch.allclose(base, edited)
    torch.testing.assert_close(model(**_batch()).logits, base)  # hook gone


def test_stop_ends_the_forward_pass_early():
    model = tiny_model("llama")
    spec = spec_for(model)
    seen = []
    later = model.get_submodule(spec.mlp_out_name(3))
    handle = later.register_forward_hook(lambda *a: seen.append(1))
    with TraceDict(model, [spec.mlp_out_name(0), spec.mlp_out_name(1)], retain_input=True, stop=True) as td:
        model(**_batch())
    handle.remove()
    assert not seen, "layers after the stop point must not run"
    assert td[spec.mlp_out_name(1)].input is not None


def test_edit_input_patches_what_the_module_sees():
    model = tiny_model("llama")
    name = spec_for(model).mlp_out_name(2)
    with Trace(model, name, retain_input=True, edit_input=lambda x, layer: torch.zeros_like(x)) as tr:
        model(**_batch())
    assert torch.count_nonzero(tr.input) == 0
