"""ROME's building blocks on tiny models: the split batch equals plain forwards, weights come back exactly."""

import pytest
import torch

from editpack.model.arch import spec_for
from editpack.methods.locate.model_state import attention_for_gradients, frozen, resolve_optimize_dtype, weights_in
from editpack.methods.locate.values import optimize_delta, optimize_deltas
from editpack.methods.locate.keys import subject_last_index
from editpack.methods.locate.split_batch import split_batch
from editpack.model.nethook import Trace

from editpack import make_fact as _fact
from tiny import TINY, tiny_model, tiny_tokenizer

TEXTS = ["the famous eiffel tower is in paris", "eiffel tower", "a red bridge . the old london bridge is big"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("cuts", [[3, 1, 6], [0, 1, 2]])
@pytest.mark.parametrize("live_from", [0, 1])
def test_split_batch_matches_unpadded_forwards(model_type, cuts, live_from):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    spec = spec_for(model)
    blocks = model.get_submodule(spec.blocks)
    originals = list(blocks)
    batch = split_batch(tok, TEXTS, cuts, torch.device("cpu"))
    with torch.no_grad():
        batch.prime(model, blocks, live_from)  # live_from=1: block 0's outputs are recorded and replayed
        assert sorted(batch.replay) == list(range(live_from))
        hidden = batch.run(model)
        assert list(blocks) == originals  # the stand-ins are gone after the run
        for row, text in enumerate(TEXTS):
            ids = tok(text, return_tensors="pt")
            with Trace(model, spec.final_norm) as tr:
                model(**ids)
            full = tr.output[0]
            start = cuts[row] - batch.edit_columns[row]  # where the suffix starts in the full text
            n = batch.suffix_lengths[row]
            torch.testing.assert_close(hidden[row, :n], full[start : start + n], rtol=1e-4, atol=1e-5)
    if min(cuts) == 0:
        assert batch.cache is None and batch.edit_columns == cuts
    else:
        assert batch.edit_columns == [0, 0, 0]


def test_replayed_blocks_are_not_computed_and_later_blocks_are():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    blocks = model.get_submodule(spec_for(model).blocks)
    batch = split_batch(tok, TEXTS, [3, 1, 6], torch.device("cpu"))
    calls = []
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *_a, i=i: calls.append(i))
    with torch.no_grad():
        batch.prime(model, blocks, 1)
        calls.clear()
        before = batch.run(model)
        assert 0 not in calls and 1 in calls
        # A change in a live block shows in the output (the replay does not freeze what depends on it).
        with Trace(model, f"{spec_for(model).blocks}.1.mlp", retain_output=False,
                   edit_output=lambda out, _layer: out + 1.0):
            after = batch.run(model)
    assert not torch.allclose(before, after)


def test_bfloat16_eager_attention_with_left_padding_stays_finite():
    """float32's mask minimum rounds to -inf in bf16; fully masked pad rows must not turn into NaN."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    spec = spec_for(model)
    batch = split_batch(tok, TEXTS, [3, 1, 6], torch.device("cpu"))  # prefixes of 3, 1, 6 tokens: left-padded
    model.set_attn_implementation("eager")
    with torch.no_grad(), weights_in(model, "bfloat16", spec):
        batch.prime(model)
        hidden = batch.run(model)
    assert torch.isfinite(hidden).all()


def test_optimize_dtype_auto_resolves_to_a_concrete_precision():
    assert resolve_optimize_dtype("float32", torch.device("cpu")) == "float32"
    assert resolve_optimize_dtype("auto", torch.device("cpu")) in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="optimize_dtype"):
        resolve_optimize_dtype("fp8", torch.device("cpu"))


def test_attention_is_eager_while_optimising_on_cpu_and_restored_after():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    with attention_for_gradients(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"


def test_split_index_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="outside the"):
        split_batch(tiny_tokenizer(), ["eiffel tower"], [9], torch.device("cpu"))


def test_subject_last_index_uses_offsets():
    tok = tiny_tokenizer()
    text = "the famous eiffel tower is in"
    start = text.index("eiffel tower")
    index = subject_last_index(tok, text, start, start + len("eiffel tower"))
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"][index]) == "tower"


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_weights_in_bfloat16_restores_the_exact_tensors(model_type):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    spec = spec_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tok("the famous eiffel tower", return_tensors="pt")
    with torch.no_grad():
        reference = model(**ids).logits
        with weights_in(model, "bfloat16", spec):
            assert get_dtype(model, spec) == torch.bfloat16
            approx = model(**ids).logits
    torch.testing.assert_close(approx, reference, rtol=0.05, atol=0.05)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    with pytest.raises(ValueError, match="optimize_dtype"):
        with weights_in(model, "int8", spec):
            pass


def get_dtype(model, spec):
    return next(model.get_submodule(spec.blocks).parameters()).dtype


def _delta_config(**extra):
    from editpack.methods.memit.config import MEMITConfig

    cfg = MEMITConfig(**{**TINY, "early_stop_loss": 0.0, "optimize_dtype": "float32", **extra})
    cfg.context_templates = ["{}", "the a one. {}", "it is two three. {}"]
    return cfg


FACTS = [
    _fact("the famous {} is in", "eiffel tower", "rome", "paris"),
    _fact("{} is the capital of", "berlin", "italy", "germany"),
    _fact("the old {} plays", "famous painter", "football", "piano"),
    _fact("{} speaks", "madrid", "japan", "spain"),
]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_batched_deltas_match_one_fact_at_a_time(model_type):
    """Each fact's δ has its own loss, and Adam is element-wise: one batch gives the one-by-one results."""
    model, tok = tiny_model(model_type), tiny_tokenizer()
    spec = spec_for(model)
    module = spec.block_name(2)
    cfg = _delta_config()
    with frozen(model), torch.enable_grad():
        together = optimize_deltas(model, tok, spec, module, FACTS, cfg)
        alone = [optimize_delta(model, tok, spec, module, fact, cfg) for fact in FACTS]
    for a, b in zip(together, alone):
        assert a.steps == b.steps == cfg.v_num_grad_steps
        assert b.delta.norm() > 0
        assert (a.delta - b.delta).norm() <= 1e-4 * b.delta.norm()
        torch.testing.assert_close(a.init, b.init, rtol=1e-5, atol=1e-6)
        assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-6)


def test_a_fact_that_stops_early_keeps_its_delta_while_others_go_on():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    spec = spec_for(model)
    module = spec.block_name(2)
    # Stop half-way down the loss of the fact whose loss falls most: it stops early, the others do not all.
    with frozen(model), torch.enable_grad():
        first = [optimize_delta(model, tok, spec, module, f, _delta_config(v_num_grad_steps=1)) for f in FACTS]
        last = [optimize_delta(model, tok, spec, module, f, _delta_config()) for f in FACTS]
    a, b = max(zip(first, last), key=lambda pair: pair[0].loss - pair[1].loss)
    threshold = (a.loss + b.loss) / 2
    cfg = _delta_config(early_stop_loss=threshold)
    with frozen(model), torch.enable_grad():
        together = optimize_deltas(model, tok, spec, module, FACTS, cfg)
        alone = [optimize_delta(model, tok, spec, module, fact, cfg) for fact in FACTS]
    assert len({r.steps for r in together}) > 1  # some stopped early, others did not
    for a, b in zip(together, alone):
        assert a.steps == b.steps
        assert (a.delta - b.delta).norm() <= 1e-4 * b.delta.norm()


# ------------------------------------------------------------------ a residual change through an output norm
def _gemma_norm(d=16, seed=0):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(seed)
    norm = Gemma3RMSNorm(d)
    with torch.no_grad():
        norm.weight.normal_(0, 5)  # gains of 1 + w, far from one, as Gemma's post-feed-forward norms are
    return norm


def test_a_reachable_change_through_an_rms_norm_is_reached_exactly():
    from editpack.methods.locate.through_norm import through_norm

    norm = _gemma_norm()
    y, other = 0.2 * torch.randn(3, 16), 0.3 * torch.randn(3, 16)
    wanted = (norm(other) - norm(y)).detach()
    delta = through_norm(norm, y, wanted)
    torch.testing.assert_close(norm(y + delta), norm(other), atol=1e-4, rtol=1e-4)


def test_a_large_change_is_reached_in_direction_with_a_small_output_change():
    from editpack.methods.locate.through_norm import through_norm

    norm = _gemma_norm()
    y = 0.2 * torch.randn(4, 16)
    wanted = 10 * torch.randn(4, 16)
    delta = through_norm(norm, y, wanted)
    reached = norm(y + delta).detach()
    target = norm(y).detach() + wanted
    assert torch.nn.functional.cosine_similarity(reached, target).min() > 0.999
    # The naive write adds `wanted` to y itself: fifty times y's size. Through the norm the change stays at y's scale.
    assert delta.norm(dim=1).max() < 0.2 * wanted.norm(dim=1).min()


def test_a_norm_that_depends_on_its_input_scale_is_refused():
    from editpack.methods.locate.through_norm import through_norm

    class Affine(torch.nn.Module):  # not scale-invariant: a linear map
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16))

        def forward(self, x):
            return x * self.weight

    with pytest.raises(ValueError, match="RMS norm"):
        through_norm(Affine(), torch.randn(2, 16), torch.randn(2, 16), name="model.layers.1.post_norm")
