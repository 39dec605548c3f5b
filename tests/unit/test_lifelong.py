"""Lifelong editing on tiny random models: GRACE codebook packs, UltraEdit, and a pack's log and diff."""

import json

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel

import editpack
from editpack import apply, edit, extend, revert
from editpack.packs.codebook import CODEBOOK_WEIGHTS, CodebookPack, insert
from editpack.errors import EditpackError, PackConflictError, PackFormatError
from editpack.share.history import diff, fact_changes, log
from editpack.methods.targets import keys_and_gradients
from editpack.methods.ultraedit.method import running_update

from tiny import FACT, TINY, logits, state, tiny_model, tiny_tokenizer

mk = editpack.make_fact
FACTS = [
    FACT,
    mk("the old {}", "london bridge", "tokyo", "london"),
    mk("the red {}", "river", "madrid", "paris"),
    mk("the big {}", "museum", "berlin", "paris"),
    mk("the blue {}", "lake", "japan", "france"),
    mk("the green {}", "mountain", "spain", "italy"),
    mk("the new {}", "company", "italy", "france"),
    mk("the small {}", "bridge", "france", "spain"),
]
GRACE = dict(layers=[1], context_template_lengths=[[3, 2]], clamp_norm_factor=1e4, v_weight_decay=0.0,
             v_num_grad_steps=40)
UNRELATED = "the famous louvre"


@pytest.fixture(params=["llama", "gpt2"])
def setup(request):
    return tiny_model(request.param), tiny_tokenizer()


def top1(model, tok, fact):
    return tok.decode(logits(model, tok, fact.text).argmax())


# ---------------------------------------------------------------------------------------------- GRACE
def test_grace_answers_from_its_codebook_and_reverts_bit_for_bit(setup, tmp_path):
    model, tok = setup
    before, base_other = state(model), logits(model, tok, UNRELATED)
    pack = edit(model, FACTS[:2], "grace", tokenizer=tok, **GRACE)
    assert isinstance(pack, CodebookPack) and pack.kind == "codebook"
    assert pack.module == editpack.spec_for(model).mlp_out_name(1) and pack.keys.shape[0] == 2
    assert all(torch.equal(before[k], v) for k, v in state(model).items())  # computing changed nothing
    edited = apply(model, pack)
    assert edited is model  # a hook on the layer: no wrapper, no adapter
    assert [top1(edited, tok, f) for f in FACTS[:2]] == ["rome", "tokyo"]
    assert torch.equal(logits(edited, tok, UNRELATED), base_other)  # no key near: the layer computes as before
    assert "hook" in repr(editpack.applied(edited)[0])
    editpack.set_enabled(edited, pack.name, False)
    assert top1(edited, tok, FACT) != "rome"
    editpack.set_enabled(edited, pack.name, True)
    plain = revert(edited)
    assert not editpack.applied(plain) and top1(plain, tok, FACT) != "rome"
    assert all(torch.equal(before[k], v) for k, v in state(plain).items())
    assert not plain.get_submodule(pack.module)._forward_hooks

    pack.save(tmp_path / "g")
    manifest = json.loads((tmp_path / "g" / "editpack.json").read_text())
    assert manifest["kind"] == "codebook" and manifest["codebook"]["entries"] == 2
    assert str(tmp_path) not in (tmp_path / "g" / "editpack.json").read_text()
    loaded = editpack.load_pack(tmp_path / "g")
    assert isinstance(loaded, CodebookPack) and loaded.content_id == pack.content_id
    assert torch.equal(loaded.values, pack.values) and torch.equal(loaded.radii, pack.radii)
    assert "codebook" in (tmp_path / "g" / "README.md").read_text()


def test_a_tampered_codebook_is_refused(setup, tmp_path):
    model, tok = setup
    pack = edit(model, FACT, "grace", tokenizer=tok, **GRACE)
    pack.save(tmp_path / "g")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "g" / CODEBOOK_WEIGHTS)
    tensors["radii"] = tensors["radii"] * 100
    save_file(tensors, tmp_path / "g" / CODEBOOK_WEIGHTS)
    with pytest.raises(PackFormatError, match="does not match its sha256"):
        editpack.load_pack(tmp_path / "g")


def test_grace_grows_round_by_round_and_a_corrected_fact_replaces_its_entry(setup):
    model, tok = setup
    first = edit(model, FACTS[:2], "grace", tokenizer=tok, name="life", **GRACE)
    second = extend(model, first, FACTS[2], tokenizer=tok)
    assert second.version == "1.1.0" and len(second.facts) == 3 and second.keys.shape[0] == 3
    assert second.parents[-1]["relation"] == "extends" and second.parents[-1]["content"] == first.content_id
    assert torch.equal(second.keys[:2], first.keys)  # earlier entries kept (radii may change by GRACE's rules)
    corrected = mk("the famous {}", "eiffel tower", "berlin", "paris")
    third = extend(model, second, corrected, tokenizer=tok)
    assert [f.target_new for f in third.facts] == ["tokyo", "madrid", "berlin"]
    edited = apply(model, third)
    assert top1(edited, tok, FACT) == "berlin" and top1(edited, tok, FACTS[1]) == "tokyo"
    revert(edited)
    with pytest.raises(EditpackError, match="grows with grace only"):
        extend(model, second, FACTS[3], method="rome", tokenizer=tok)


def test_insert_adds_grows_and_splits_radii():
    keys, radii = torch.zeros(0, 2), torch.zeros(0)
    keys, radii, event = insert(keys, radii, [], torch.tensor([0.0, 0.0]), 1.0, "rome")
    assert event == "added"
    keys, radii, event = insert(keys, radii, ["rome"], torch.tensor([5.0, 0.0]), 1.0, "paris")
    assert event == "added" and radii.tolist() == [1.0, 1.0]  # 5 > 1 + 1: no overlap
    keys, radii, event = insert(keys, radii, ["rome", "paris"], torch.tensor([0.0, 1.5]), 1.0, "Rome")
    assert event == "expanded" and radii.tolist() == [1.5, 1.0, 1.0]  # same answer: the old radius reaches it
    keys, radii, event = insert(keys, radii, ["rome", "paris", "rome"], torch.tensor([5.0, 1.0]), 1.0, "tokyo")
    assert event == "split" and radii.tolist() == [1.5, 0.5, 1.0, 0.5]  # another answer: both shrink to d/2


def test_grace_stacks_with_a_weight_pack_and_each_comes_off_alone(setup):
    model, tok = setup
    before = state(model)
    rome = edit(model, FACTS[1], tokenizer=tok, layers=[1], **TINY)
    grace = edit(model, FACT, "grace", tokenizer=tok, **GRACE)
    edited = apply(model, [rome, grace])
    assert isinstance(edited, PeftModel)
    assert [top1(edited, tok, f) for f in FACTS[:2]] == ["rome", "tokyo"]
    edited = editpack.remove(edited, grace.ref)
    assert top1(edited, tok, FACT) != "rome" and top1(edited, tok, FACTS[1]) == "tokyo"
    edited = apply(edited, grace)
    edited = editpack.remove(edited, rome.ref)  # the last adapter: PEFT unloads, the codebook stays on
    assert not isinstance(edited, PeftModel) and [r.pack.ref for r in editpack.applied(edited)] == [grace.ref]
    assert top1(edited, tok, FACT) == "rome"
    plain = revert(edited)
    assert all(torch.equal(before[k], v) for k, v in state(plain).items())
    with pytest.raises(PackConflictError, match="not summed into one"):
        editpack.stack([grace, grace])


def test_grace_pack_on_another_model_is_refused(setup):
    model, tok = setup
    pack = edit(model, FACT, "grace", tokenizer=tok, **GRACE)
    other = tiny_model(model.config.model_type, seed=5)
    with pytest.raises(editpack.errors.FingerprintMismatchError):
        apply(other, pack)


def test_the_radius_cap_is_on_by_default_and_a_codebook_made_without_it_grows_without_it(setup):
    model, tok = setup
    assert edit(model, FACT, "grace", tokenizer=tok, **GRACE).hyperparameters["unrelated_samples"] == [32, 24]
    old = edit(model, FACTS[:1], "grace", tokenizer=tok, unrelated_samples=None, name="life", **GRACE)
    grown = extend(model, old, FACTS[1], tokenizer=tok)
    assert grown.hyperparameters["unrelated_samples"] is None and grown.keys.shape[0] == 2


def test_grace_settings_are_checked_before_any_work(setup):
    model, tok = setup
    with pytest.raises(ValueError, match="one layer"):
        edit(model, FACT, "grace", tokenizer=tok, layers=[1, 2])
    with pytest.raises(ValueError, match="key_position"):
        edit(model, FACT, "grace", tokenizer=tok, key_position="middle")
    with pytest.raises(ValueError, match="unrelated_samples"):
        edit(model, FACT, "grace", tokenizer=tok, unrelated_samples=[32])


def test_codebook_pushes_and_pulls_through_the_hub(hub, tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    pack = edit(model, FACTS[:2], "grace", tokenizer=tok, name="life", **GRACE)
    pack.save(tmp_path / "g")
    editpack.push(tmp_path / "g", "team/life")
    pulled = editpack.pull("team/life@1.0.0")
    assert isinstance(pulled, CodebookPack) and pulled.content_id == pack.content_id
    edited = apply(model, "team/life@1.0.0")
    assert top1(edited, tok, FACT) == "rome"
    revert(edited)


# ---------------------------------------------------------------------------------------------- UltraEdit
def test_ultraedit_is_the_ridge_solution_of_its_normalised_gradients(setup):
    model, tok = setup
    spec = editpack.spec_for(model)
    pack = edit(model, FACTS, "ultraedit", tokenizer=tok, layers=[2, 3], lr=0.05)
    keys, grads = keys_and_gradients(model, tok, spec, [spec.mlp_out_name(i) for i in (2, 3)], FACTS)
    for name in keys:
        K, G = keys[name], grads[name]
        assert K.shape[0] == len(FACTS)  # one target token per fact here
        stats: dict = {}
        mean, var = running_update(stats, name, torch.cat([K, G], 1))
        z = ((torch.cat([K, G], 1).double() - mean) / (var + 1e-8).sqrt()).float()
        k_hat, g_hat = z.split([K.shape[1], G.shape[1]], 1)
        V = -0.05 * k_hat.square().sum(1, keepdim=True) * g_hat
        reference = torch.linalg.solve(K.T @ K + torch.eye(K.shape[1]), K.T @ V).T  # the authors' (in × in) form
        torch.testing.assert_close(pack.delta.modules[name].dense(), reference, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(pack.delta.state[f"{name}.mean"].double(), mean, rtol=1e-5, atol=1e-6)


def test_ultraedit_at_every_position_takes_the_gradient_that_reaches_the_prompt(setup):
    model, tok = setup
    spec = editpack.spec_for(model)
    name = spec.mlp_out_name(2)
    keys, grads = keys_and_gradients(model, tok, spec, [name], FACTS, positions="all")
    lengths = [len(tok(f.text)["input_ids"]) + 1 for f in FACTS]  # prompt and its one target token
    assert keys[name].shape[0] == grads[name].shape[0] == sum(lengths)
    ends = torch.tensor(lengths).cumsum(0)
    norms = grads[name].norm(dim=-1)
    assert (norms[ends - 1] == 0).all()  # the target's own position predicts nothing: no loss reaches it
    assert (norms[ends - 2] > 0).all()  # the prompt's last position predicts the target
    assert (norms[: lengths[0] - 2] > 0).any()  # earlier prompt positions: through attention
    target_keys, _ = keys_and_gradients(model, tok, spec, [name], FACTS)
    torch.testing.assert_close(keys[name][ends - 2], target_keys[name])
    pack = edit(model, FACTS, "ultraedit", tokenizer=tok, layers=[2], lr=0.05, positions="all")
    K, G = keys[name], grads[name]
    mean, var = running_update({}, name, torch.cat([K, G], 1))
    z = ((torch.cat([K, G], 1).double() - mean) / (var + 1e-8).sqrt()).float()
    k_hat, g_hat = z.split([K.shape[1], G.shape[1]], 1)
    V = -0.05 * k_hat.square().sum(1, keepdim=True) * g_hat
    reference = torch.linalg.solve(K.T @ K + torch.eye(K.shape[1]), K.T @ V).T
    torch.testing.assert_close(pack.delta.modules[name].dense(), reference, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="positions must be one of .*not .subjects."):
        edit(model, FACTS, "ultraedit", tokenizer=tok, positions="subjects")


def test_ultraedit_moves_the_answers_and_keeps_normalising_across_rounds(setup, tmp_path):
    model, tok = setup
    base = [float(logits(model, tok, f.text).log_softmax(-1)[tok.convert_tokens_to_ids(f.target_new)]) for f in FACTS]
    first = edit(model, FACTS, "ultraedit", tokenizer=tok, lr=0.05, name="ultra")
    edited = apply(model, first)
    after = [float(logits(edited, tok, f.text).log_softmax(-1)[tok.convert_tokens_to_ids(f.target_new)]) for f in FACTS]
    model = revert(edited)
    assert sum(a > b for a, b in zip(after, base)) >= 7, (base, after)
    first.save(tmp_path / "u1")
    second = extend(model, editpack.load_pack(tmp_path / "u1"), [mk("the two {}", "museum", "london", "paris")],
                    tokenizer=tok)
    name = next(iter(second.delta.modules))
    assert float(second.delta.state[f"{name}.count"]) == pytest.approx(len(FACTS) + 1, abs=1e-3)
    assert second.parents[-1]["relation"] == "extends" and len(second.facts) == len(FACTS) + 1


def test_ultraedit_refuses_a_first_round_too_small_to_normalise(setup):
    model, tok = setup
    with pytest.raises(EditpackError, match="too few to normalise"):
        edit(model, FACT, "ultraedit", tokenizer=tok)


# ---------------------------------------------------------------------------------------------- log and diff
def test_log_and_diff_of_a_lifelong_pack(setup, tmp_path):
    model, tok = setup
    versions = tmp_path / "versions"
    pack = edit(model, FACTS[:2], "grace", tokenizer=tok, name="life", **GRACE)
    pack.save(versions / "life-1.0.0")
    corrected = mk("the famous {}", "eiffel tower", "berlin", "paris")
    for i, batch in enumerate([FACTS[2:4], [corrected]]):
        pack = extend(model, pack, batch, tokenizer=tok)
        pack.save(versions / f"life-{pack.version}")
    (versions / "notes").mkdir()  # anything that is not a pack is passed over
    entries = log(versions / "life-1.2.0")
    assert [e.pack.version for e in entries] == ["1.0.0", "1.1.0", "1.2.0"]
    assert [e.changes.counts for e in entries] == ["+2 ~0 -0", "+2 ~0 -0", "+0 ~1 -0"]
    assert entries[-1].parts == {pack.module: "4 codebook entries"} and entries[0].size > 0
    assert [e.pack.version for e in log(versions)] == ["1.0.0", "1.1.0", "1.2.0"]

    found = diff(versions / "life-1.0.0", versions / "life-1.2.0")
    assert len(found.changes.added) == 2 and len(found.changes.replaced) == 1
    text = "\n".join(found.lines())
    assert "'rome' → 'berlin'" in text and "2 codebook entries → 4 codebook entries" in text

    from editpack.cli.main import main

    result = CliRunner().invoke(main, ["log", str(versions / "life-1.2.0")])
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.output.splitlines()] == ["1.0.0", "1.1.0", "1.2.0"]
    result = CliRunner().invoke(main, ["diff", str(versions / "life-1.1.0"), str(versions / "life-1.2.0"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["replaced"][0]["new"]["target_new"] == "berlin"


def test_fact_changes_match_by_subject_and_relation():
    old = [FACT, FACTS[1]]
    new = [mk("the famous {}", "eiffel tower", "berlin", "paris"), FACTS[2]]
    changes = fact_changes(old, new)
    assert [f.subject for f in changes.added] == ["river"]
    assert [(o.target_new, n.target_new) for o, n in changes.replaced] == [("rome", "berlin")]
    assert [f.subject for f in changes.removed] == ["london bridge"]


# ---------------------------------------------------------------------------------------------- where codebooks run
def test_codebook_on_an_8bit_model_and_in_a_pipeline(tmp_path):
    pytest.importorskip("bitsandbytes")
    import transformers

    sizes = dict(hidden_size=64, intermediate_size=128)  # bitsandbytes' blocks need rows of >= 64
    model, tok = tiny_model("llama", **sizes), tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    pack = edit(model, FACTS[:2], "grace", tokenizer=tok, **GRACE)
    quantized, _ = editpack.load_model(str(tmp_path / "m"), load_in_8bit=True)
    assert type(quantized.get_submodule(pack.module)).__module__.startswith("bitsandbytes")
    before = logits(quantized, tok, UNRELATED)
    edited = apply(quantized, pack)
    assert [top1(edited, tok, f) for f in FACTS[:2]] == ["rome", "tokyo"]
    assert torch.equal(logits(edited, tok, UNRELATED), before)
    plain = revert(edited)
    assert top1(plain, tok, FACT) != "rome"

    generator = transformers.pipeline("text-generation", model=apply(model, pack), tokenizer=tok)
    out = generator(FACT.text, max_new_tokens=1, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"].split() == ["rome"]
    piped = editpack.pipeline(model=revert(model), packs=[pack], tokenizer=tok)
    assert piped(FACTS[1].text, max_new_tokens=1, do_sample=False, return_full_text=False)[0]["generated_text"].split() == ["tokyo"]


def test_codebook_on_a_model_offloaded_to_disk(tmp_path):
    sizes = dict(hidden_size=64, intermediate_size=128)
    model, tok = tiny_model("llama", **sizes), tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    pack = edit(model, FACTS[:2], "grace", tokenizer=tok, **GRACE)
    expected = logits(apply(model, pack), tok, FACT.text)
    offloaded, _ = editpack.load_model(str(tmp_path / "m"), device_map="auto", max_memory={"cpu": 60_000},
                                       offload_folder=str(tmp_path / "offload"))
    assert "disk" in offloaded.hf_device_map.values()
    edited = apply(offloaded, pack)
    torch.testing.assert_close(logits(edited, tok, FACT.text), expected, rtol=1e-5, atol=1e-5)
    assert top1(revert(edited), tok, FACT) != "rome"


def test_cli_grows_a_codebook_and_logs_it_quietly(tiny_dir, tmp_path):
    """edit --method grace, edit --onto, log and diff in fresh processes; a statistics corpus in the environment
    is not handed to a method without statistics, and no library warning reaches the terminal."""
    import os

    from conftest import run_cli_quietly

    env = dict(os.environ, EDITPACK_HOME=str(tmp_path / "home"), EDITPACK_CORPUS=str(tmp_path / "no-such-corpus"))
    settings = [item for key, value in GRACE.items() if key != "layers"
                for item in ("--set", f"{key}={json.dumps(value)}")]
    v1, v2 = tmp_path / "packs" / "life-1.0.0", tmp_path / "packs" / "life-1.1.0"
    commands = [
        ["edit", "--model", str(tiny_dir), "--method", "grace", "--layers", "1", "--name", "life", "--prompt",
         "the famous eiffel tower", "--subject", "eiffel tower", "--target", "rome", *settings, "-o", str(v1)],
        ["edit", "--model", str(tiny_dir), "--onto", str(v1), "--prompt", "the old london bridge", "--subject",
         "london bridge", "--target", "tokyo", "-o", str(v2)],
        ["log", str(v2)],
        ["diff", str(v1), str(v2)],
    ]
    outputs = run_cli_quietly(commands, env)
    assert "a codebook of 2 entries" in outputs[1]
    assert [line.split()[0] for line in outputs[2].splitlines()] == ["1.0.0", "1.1.0"]
    assert "+ 'the old london bridge' → 'tokyo'" in outputs[3]


# ---------------------------------------------------------------------------------------------- WISE
def side_memory(model, threshold: float, seed: int = 0) -> "editpack.SideMemoryPack":
    """A hand-made side memory of layer 1 (a random ΔW), to check routing itself."""
    from editpack.packs.base_model import describe_base
    from editpack.packs.delta import LowRankDelta, WeightDelta

    spec = editpack.spec_for(model)
    name = spec.mlp_out_name(1)
    out, inp = spec.weight_matrix(model.get_submodule(name)).shape
    torch.manual_seed(seed)
    delta = WeightDelta()
    delta.add(name, LowRankDelta.from_dense(torch.randn(out, inp) * 0.5))
    return editpack.SideMemoryPack(name="side", version="1.0.0", method="wise", hyperparameters={}, facts=[FACT],
                                   base=describe_base(model, [name]), delta=delta, threshold=threshold,
                                   fan_in_fan_out=spec.mlp_transposed)


def test_side_memory_routes_exactly_the_positions_above_its_threshold(setup, tmp_path):
    from editpack.model.nethook import Trace

    model, tok = setup
    before = state(model)
    inputs = tok(["the famous eiffel tower is in the city of"], return_tensors="pt")
    module = editpack.spec_for(model).mlp_out_name(1)
    with Trace(model, module, retain_input=True) as plain:
        model(**inputs)
    probe = side_memory(model, 0.0)
    (delta,) = probe.delta.modules.values()
    shift = plain.input.float() @ delta.dense().T
    norms = shift.norm(dim=-1)[0].detach()
    threshold = float(norms.median())
    pack = side_memory(model, threshold)
    edited = apply(model, pack)
    with Trace(edited, module, retain_output=True) as routed:
        edited(**inputs)
    routed_rows = norms > threshold
    assert 0 < int(routed_rows.sum()) < norms.numel()
    expected = plain.output.clone()
    expected[0, routed_rows] += shift[0, routed_rows].to(expected.dtype)
    torch.testing.assert_close(routed.output, expected)
    plain_again = revert(edited)
    assert all(torch.equal(before[k], v) for k, v in state(plain_again).items())

    pack.save(tmp_path / "s")
    loaded = editpack.load_pack(tmp_path / "s")
    assert isinstance(loaded, editpack.SideMemoryPack) and loaded.threshold == threshold
    assert loaded.content_id == pack.content_id
    reloaded = PeftModel.from_pretrained(plain_again, str(tmp_path / "s"))  # the side delta alone, as a PEFT LoRA
    assert isinstance(reloaded, PeftModel)
    reloaded.unload()
    manifest = json.loads((tmp_path / "s" / "editpack.json").read_text())
    manifest["router"]["threshold"] = 0.0
    (tmp_path / "s" / "editpack.json").write_text(json.dumps(manifest))
    with pytest.raises(PackFormatError, match="router section does not match"):
        editpack.load_pack(tmp_path / "s")


def test_ties_merge_elects_signs_and_averages_agreeing_shards():
    from editpack.methods.wise.method import ties_merge

    a, b = torch.tensor([1.0, 2.0, -1.0, 0.0]), torch.tensor([3.0, -4.0, 0.0, 0.0])
    masks = [torch.tensor([True, True, True, False]), torch.tensor([True, True, False, False])]
    assert ties_merge([a, b], masks).tolist() == [2.0, -4.0, -1.0, 0.0]


def test_wise_learns_its_facts_and_grows_by_rounds():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    settings = dict(layers=[2], lr=0.1, unrelated_samples=[8, 6])

    def nll(m):
        return sum(-float(logits(m, tok, f.text).log_softmax(-1)[tok.convert_tokens_to_ids(f.target_new)])
                   for f in FACTS[:4])

    pack = edit(model, FACTS[:4], "wise", tokenizer=tok, name="wise-life", **settings)
    assert pack.kind == "side_memory" and pack.threshold > 0
    base = nll(model)
    edited = apply(model, pack)
    assert nll(edited) < base  # the router lets the side memory answer (tiny random models learn little)
    model = revert(edited)
    grown = extend(model, pack, FACTS[4:6], tokenizer=tok)
    assert grown.version == "1.1.0" and len(grown.facts) == 6 and grown.parents[-1]["relation"] == "extends"
    assert not torch.equal(grown.delta.modules[pack.module].dense(), pack.delta.modules[pack.module].dense())


@pytest.mark.parametrize("kind", ["grace", "wise"])
def test_routed_packs_on_8bit_offloaded_and_pipeline_models_match_the_full_model(kind, tmp_path):
    """The hook computes the same on an 8-bit, a disk-offloaded model and inside a pipeline as on the full one."""
    import transformers

    sizes = dict(hidden_size=64, intermediate_size=128)
    model, tok = tiny_model("llama", **sizes), tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    pack = (edit(model, FACTS[:2], "grace", tokenizer=tok, **GRACE) if kind == "grace"
            else side_memory(model, threshold=0.0))
    edited = apply(model, pack)
    full = logits(edited, tok, FACT.text)
    generator = transformers.pipeline("text-generation", model=edited, tokenizer=tok)
    expected = tok.decode(full.argmax())
    assert generator(FACT.text, max_new_tokens=1, do_sample=False,
                     return_full_text=False)[0]["generated_text"].split() == [expected]
    revert(edited)
    offloaded, _ = editpack.load_model(str(tmp_path / "m"), device_map="auto", max_memory={"cpu": 60_000},
                                       offload_folder=str(tmp_path / "offload"))
    torch.testing.assert_close(logits(apply(offloaded, pack), tok, FACT.text), full, rtol=1e-5, atol=1e-5)
    pytest.importorskip("bitsandbytes")
    quantized, _ = editpack.load_model(str(tmp_path / "m"), load_in_8bit=True)
    base8 = logits(quantized, tok, FACT.text)
    edited8 = apply(quantized, pack)
    moved = logits(edited8, tok, FACT.text)
    assert not torch.equal(moved, base8)  # the hook acts on the 8-bit layer
    assert tok.decode(moved.argmax()) == expected
    assert torch.equal(logits(revert(edited8), tok, FACT.text), base8)


def test_wise_pack_stacks_with_a_weight_pack_and_goes_through_the_hub(hub, tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rome = edit(model, FACTS[1], tokenizer=tok, layers=[1], **TINY)
    side = side_memory(model, threshold=0.0)
    alone = logits(apply(model, side), tok, FACT.text)
    model = revert(model)
    edited = apply(model, [rome, side])
    assert top1(edited, tok, FACTS[1]) == "tokyo"
    assert [r.pack.kind for r in editpack.applied(edited)] == ["weight", "side_memory"]
    model = revert(edited)
    side.save(tmp_path / "s")
    editpack.push(tmp_path / "s", "team/side")
    pulled = editpack.pull("team/side@1.0.0")
    assert isinstance(pulled, editpack.SideMemoryPack) and pulled.content_id == side.content_id
    torch.testing.assert_close(logits(apply(model, pulled), tok, FACT.text), alone)


def test_grace_radii_stop_short_of_unrelated_text():
    from editpack.methods.locate.keys import inputs_everywhere
    from editpack.methods.locate.context import unrelated_texts

    model, tok = tiny_model("llama"), tiny_tokenizer()
    free = edit(model, FACTS[:3], "grace", tokenizer=tok, unrelated_samples=None, **GRACE)
    capped = edit(model, FACTS[:3], "grace", tokenizer=tok, unrelated_samples=[8, 6], radius_margin=0.5, **GRACE)
    unrelated = inputs_everywhere(model, tok, capped.module, unrelated_texts(model, tok, 8, 6, 0))
    limit = 0.5 * torch.cdist(capped.keys, unrelated).amin(dim=1)
    floor = 1e-3 * capped.keys.norm(dim=1)
    assert torch.all(capped.radii <= torch.maximum(limit, floor) + 1e-6)
    assert torch.all(capped.radii <= free.radii + 1e-6) and torch.equal(capped.keys, free.keys)
    edited = apply(model, capped)
    assert [top1(edited, tok, f) for f in FACTS[:2]] == ["rome", "tokyo"]  # the edit prompts still match
    revert(edited)
