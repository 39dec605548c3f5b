"""KN on tiny random models: integrated gradients add up, the edit is rank one per layer on the kept neurons."""

import pytest
import torch

import editpack
from editpack import apply, edit, revert
from editpack.methods.kn import KN, KNConfig
from editpack.model.nethook import Trace

from tiny import FACT, logits, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attributions_add_up_to_the_probability_change(family):
    """Completeness of integrated gradients: Σ attributions ≈ p(y | a) − p(y | 0) (Riemann error shrinks with steps).
    The path runs the last token alone on the prompt's cached prefix; p is read from full forward passes."""
    model, tok = tiny_model(family), tiny_tokenizer()
    spec = editpack.spec_for(model)
    answer = tok.convert_tokens_to_ids("paris")
    module = spec.mlp_out_name(2)
    kn = KN(KNConfig(ig_steps=200))
    kn.resolve_layers(model, spec)
    scores = kn.attribution(model, spec, kn.prompt_context(model, tok, spec, FACT.text), 2, answer)

    def prob(scale: float) -> float:
        def scaled(inputs, _name):
            inputs = inputs.clone()
            inputs[:, -1] *= scale
            return inputs

        with torch.no_grad(), Trace(model, module, retain_output=False, edit_input=scaled):
            return float(logits(model, tok, FACT.text).softmax(-1)[answer])

    assert abs(float(scores.sum()) - (prob(1.0) - prob(0.0))) < 0.02 * max(abs(prob(1.0) - prob(0.0)), 1e-3) + 1e-5


def test_kn_moves_the_kept_neurons_value_vectors_toward_the_new_answer():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    spec = editpack.spec_for(model)
    pack = edit(model, FACT, "kn", tokenizer=tok, max_neurons=5, edit_scale=4.0)
    assert 0 < sum(int(d.A.sum()) for d in pack.delta.modules.values()) <= 5
    head = model.lm_head.weight.detach()
    new, old = tok.convert_tokens_to_ids("rome"), tok.convert_tokens_to_ids("paris")
    for name, delta in pack.delta.modules.items():
        assert delta.rank == 1
        dense = delta.dense()
        columns = torch.nonzero(dense.abs().sum(0)).flatten()
        assert torch.equal(columns, torch.nonzero(delta.A[0]).flatten())  # only the kept neurons' value vectors
        torch.testing.assert_close(dense[:, columns[0]], 4.0 * (head[new] - head[old]))
    before = logits(model, tok, FACT.text).log_softmax(-1)
    edited = apply(model, pack)
    after = logits(edited, tok, FACT.text).log_softmax(-1)
    revert(edited)
    assert after[new] - after[old] > before[new] - before[old]  # the new answer gains on the old one
    assert spec.num_layers(model) == 4 and pack.hyperparameters["layers"] == [0, 1, 2, 3]


def test_layers_batched_in_one_pass_give_each_layers_own_attribution():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    spec = editpack.spec_for(model)
    answer = tok.convert_tokens_to_ids("paris")
    kn = KN(KNConfig(ig_steps=8))
    context = kn.prompt_context(model, tok, spec, FACT.text) if kn.resolve_layers(model, spec) else None
    together = kn.attributions(model, spec, context, [0, 1, 2, 3], answer)
    assert list(together) == [0, 1, 2, 3]
    for layer in range(4):
        torch.testing.assert_close(together[layer], kn.attribution(model, spec, context, layer, answer),
                                   rtol=1e-4, atol=1e-7)
