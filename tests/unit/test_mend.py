"""MEND on tiny random models: the trainer (split, seed, resume), the editor artifact, edits made with it."""

import json

import pytest
import torch
from click.testing import CliRunner

import editpack
from editpack import apply, edit, revert
from editpack.cli.main import main
from editpack.packs.editor import EDITOR_WEIGHTS, Editor
from editpack.errors import EditpackError, PackFormatError
from editpack.methods.mend.config import MENDConfig
from editpack.methods.mend.method import MENDLearner, MENDNetwork, gradient_factors, network_for
from editpack.methods.targets import keys_and_gradients, target_batch
from editpack.model.nethook import Trace
from editpack.methods.training import Trainer, TrainSettings, split

from tiny import FACT, logits, state, tiny_model, tiny_tokenizer

SUBJECTS = ["eiffel tower", "london bridge", "river", "museum", "lake", "mountain", "company", "bridge"]
CITIES = ["rome", "paris", "tokyo", "london", "madrid", "berlin"]
RECORDS = [editpack.make_fact("the famous {}", s, CITIES[i % 6], CITIES[(i + 1) % 6], paraphrases=[f"the big {s}"],
                              neighborhood=[("the famous louvre", "paris")])
           for i, s in enumerate(SUBJECTS * 3)]
SMALL = dict(layers=[2, 3], rank=16)
#: MEND as published (the answer positions, its initial step, one step): what these tests of its mechanics train.
PUBLISHED = dict(positions="target", edit_lr=1e-4, steps=1)


def settings(**extra) -> TrainSettings:
    return TrainSettings(**{**dict(max_steps=20, batch_size=4, held_out=4, eval_every=10, checkpoint_every=10,
                                   lr=1e-3), **extra})


@pytest.fixture
def trained():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    editor = editpack.train(model, "mend", RECORDS, tokenizer=tok, settings=settings(), progress=False, name="mend-tiny",
                            data=[{"name": "records.json", "sha256": "0" * 64, "records": len(RECORDS)}], **SMALL,
                            **PUBLISHED)
    return model, tok, editor


def test_the_split_is_seeded_disjoint_and_never_trained_on():
    train, held = split(24, 4, seed=0)
    assert len(held) == 4 and not set(train) & set(held) and split(24, 4, seed=0) == (train, held)
    assert split(24, 4, seed=1) != (train, held)
    trainer = Trainer(_Counting(), RECORDS, settings(max_steps=12))
    seen = {i for step in range(12) for i in trainer.batch_indices(step)}
    assert not seen & set(trainer.held_idx)
    with pytest.raises(ValueError, match="nothing to train on"):
        split(4, 4, seed=0)


class _Counting:
    """A learner with one parameter, for the trainer's own bookkeeping."""

    def __init__(self):
        self.w = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return [self.w]

    def loss(self, batch):
        return (self.w - len(batch)).square().sum(), {}

    def evaluate(self, records):
        return {"score": float(self.w)}

    def state_dict(self):
        return {"w": self.w.detach()}

    def load_state_dict(self, values):
        self.w.data.copy_(values["w"])


def test_an_editor_is_an_artifact_that_edits_as_mend(trained, tmp_path):
    model, tok, editor = trained
    assert editor.kind == "editor" and editor.trained_modules == ["model.layers.2.mlp.down_proj",
                                                                  "model.layers.3.mlp.down_proj"]
    training = editor.training
    assert training["steps"] == 20 and training["held_out_records"] == 4 and training["records"] == len(RECORDS)
    assert [p["step"] for p in training["curve"]] == [10, 20] and "held_out_edit_success" in training["curve"][0]
    assert 0 <= training["curve"][-1]["held_out_neighbourhood_kept"] <= 1
    path = editor.save(tmp_path / "editor")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", EDITOR_WEIGHTS, "editpack.json"]
    card = (path / "README.md").read_text()
    assert "MEND editor" in card and "Learning curve" in card and "| 20 |" in card and "records.json" in card
    loaded = editpack.load_pack(path)
    assert isinstance(loaded, Editor) and loaded.content_id == editor.content_id
    original = state(model)
    pack = edit(model, FACT, "mend", tokenizer=tok, editor=str(path))
    assert pack.kind == "weight" and pack.hyperparameters["editor"] == "mend-tiny@1.0.0"
    assert pack.hyperparameters["editor_content"] == editor.content_id and str(tmp_path) not in json.dumps(
        pack.manifest())
    assert set(pack.delta.modules) == set(editor.trained_modules)
    n_target = len(tok(" rome", add_special_tokens=False)["input_ids"])
    assert all(d.rank <= n_target for d in pack.delta.modules.values())
    # The pack's delta is the network's: ΔW = -α Σ δ̃ ũᵀ over the target tokens.
    net = MENDNetwork({m: tuple(s) for m, s in editor.training["shapes"].items()}, 16, PUBLISHED["edit_lr"])
    net.load_state_dict(editor.tensors)
    before = logits(model, tok, FACT.text)
    edited = apply(model, pack)
    assert not torch.equal(logits(edited, tok, FACT.text), before)
    plain = revert(edited)
    assert all(torch.equal(original[k], v) for k, v in state(plain).items())
    # Batch editing sums the facts' terms: rank grows with the facts.
    two = edit(model, RECORDS[:2], "mend", tokenizer=tok, editor=str(path))
    assert all(d.rank == 2 * n_target for d in two.delta.modules.values())


def test_steps_map_the_gradient_of_the_model_with_the_edit_so_far(trained, tmp_path):
    """``steps=2``: the first step's factors are the one-step edit's; the second's are the editor's map of the
    gradient of the model with the first step's edit applied; the pack records the setting."""
    model, tok, editor = trained
    path = editor.save(tmp_path / "editor")
    one = edit(model, FACT, "mend", tokenizer=tok, editor=str(path))
    two = edit(model, FACT, "mend", tokenizer=tok, editor=str(path), steps=2)
    assert two.hyperparameters["steps"] == 2 and one.hyperparameters["steps"] == 1
    net, modules = network_for(editor), editor.trained_modules
    edited = apply(model, one, merge=True)
    try:
        keys, grads = gradient_factors(edited, tok, editpack.spec_for(edited), modules, [FACT], "target")
    finally:
        revert(edited)
    for m in modules:
        first, both = one.delta.modules[m], two.delta.modules[m]
        r = first.rank
        assert both.rank == 2 * r
        assert torch.equal(both.A[:r], first.A) and torch.equal(both.B[:, :r], first.B)
        A, B = net.factors(m, keys[m], grads[m])
        assert not torch.allclose(A, first.A)  # the edited model's gradient, not the first one again
        assert torch.allclose(both.A[r:], A, atol=1e-5) and torch.allclose(both.B[:, r:], B, atol=1e-7)
    with pytest.raises(ValueError, match="steps must be ≥ 1"):
        MENDConfig(steps=0).validate()


def test_an_editor_carries_its_number_of_steps(trained, tmp_path):
    """An editor trained with ``steps=N`` scores its held-out edits with N steps and edits with N unless told
    otherwise; an editor whose record has no number (made before the setting) edits with one, as MEND."""
    model, tok, editor = trained
    assert editor.hyperparameters["steps"] == 1  # trained with MEND's one step, recorded
    calls = []
    learner = MENDLearner(model, tok, editpack.spec_for(model), editor.trained_modules, MENDConfig(steps=3, rank=16))
    factors = learner.factors
    learner.factors = lambda facts, observe=False: calls.append(len(facts)) or factors(facts, observe)
    learner.evaluate(RECORDS[:2])
    assert calls == [1] * 6  # three steps for each of the two held-out facts
    path = editor.save(tmp_path / "editor")
    one = edit(model, FACT, "mend", tokenizer=tok, editor=str(path))
    manifest = json.loads((path / "editpack.json").read_text())
    del manifest["hyperparameters"]["steps"]  # an editor made before the setting
    (path / "editpack.json").write_text(json.dumps(manifest))
    assert edit(model, FACT, "mend", tokenizer=tok, editor=str(path)).hyperparameters["steps"] == 1
    manifest["hyperparameters"]["steps"] = 3
    (path / "editpack.json").write_text(json.dumps(manifest))
    own = edit(model, FACT, "mend", tokenizer=tok, editor=str(path))
    told = edit(model, FACT, "mend", tokenizer=tok, editor=str(path), steps=1)
    assert own.hyperparameters["steps"] == 3 and told.hyperparameters["steps"] == 1
    for m in editor.trained_modules:
        assert own.delta.modules[m].rank == 3 * one.delta.modules[m].rank == 3 * told.delta.modules[m].rank


def test_an_editor_trained_at_every_position_edits_at_every_position(tmp_path):
    """``positions="all"`` (the authors' choice): the editor records it, its edits take a factor at every position
    the loss reaches (not the last one), and the pack's delta is the network's on exactly those rows."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    editor = editpack.train(model, "mend", RECORDS, tokenizer=tok, settings=settings(max_steps=4, eval_every=2,
                                                                                      checkpoint_every=2),
                            progress=False, name="mend-all", positions="all", steps=1, **SMALL)
    assert editor.hyperparameters["positions"] == "all"
    path = editor.save(tmp_path / "editor")
    pack = edit(model, FACT, "mend", tokenizer=tok, editor=str(path))
    assert "positions" not in pack.hyperparameters  # the editor's setting, not the edit's
    spec, modules = editpack.spec_for(model), editor.trained_modules
    batch = target_batch(tok, [FACT], "cpu")
    length = int(batch.inputs["attention_mask"].sum())
    keys, grads = gradient_factors(model, tok, spec, modules, [FACT], "all")
    _, raw = keys_and_gradients(model, tok, spec, modules, [FACT], positions="all")
    # Layer 2: every position but the last (which predicts nothing) gets a gradient; layer 3 is the model's last,
    # where only the positions that predict the target do (no attention follows it).
    assert [keys[m].shape[0] for m in modules] == [length - 1, len(batch.tokens)] and length - 1 > len(batch.tokens)
    assert all(raw[m].shape[0] == length for m in modules)
    net = network_for(editpack.load_pack(path))
    for m in modules:
        assert pack.delta.modules[m].rank == keys[m].shape[0]
        A, B = net.factors(m, keys[m], grads[m])
        assert torch.allclose(pack.delta.modules[m].A, A) and torch.allclose(pack.delta.modules[m].B, B)
    with pytest.raises(ValueError, match="positions must be one of 'target', 'all', 'subject', not 'subjects'"):
        MENDConfig(positions="subjects").validate()


def test_an_editor_trained_at_the_subject_edits_with_the_subject_last_token(tmp_path):
    """``positions="subject"``: one factor per fact, taken at the subject's last token (the module's input there
    is the key, as ROME's), so the edit is rank 1 per fact and step, and moves nothing on a prompt that neither
    names the subject nor shares its key."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    editor = editpack.train(model, "mend", RECORDS, tokenizer=tok, settings=settings(max_steps=4, eval_every=2,
                                                                                      checkpoint_every=2),
                            progress=False, name="mend-subject", positions="subject", **SMALL)
    path = editor.save(tmp_path / "editor")
    facts = [FACT, editpack.make_fact("the river {} is in", "lake", "rome", "paris")]
    spec, modules = editpack.spec_for(model), editor.trained_modules
    keys, grads = keys_and_gradients(model, tok, spec, modules, facts, positions="subject")
    for m in modules:
        with Trace(model, m, retain_input=True) as trace:
            for row, fact in enumerate(facts):
                ids = tok(fact.text, return_tensors="pt")
                model(**ids)
                last = max(i for i, (a, b) in enumerate(tok(fact.text, return_offsets_mapping=True)["offset_mapping"])
                           if a < fact.text.index(fact.subject) + len(fact.subject) and b > a)
                torch.testing.assert_close(keys[m][row], trace.input[0, last].float())
    pack = edit(model, facts, "mend", tokenizer=tok, editor=str(path), steps=2)
    # Layer 2: both facts, each step. Layer 3 is the model's last: no attention carries the loss back to a subject
    # that does not end its prompt, so only the first fact's row (its subject ends the prompt) has a gradient.
    assert [pack.delta.modules[m].rank for m in modules] == [2 * len(facts), 2]
    with pytest.raises(ValueError, match="one row per fact"):
        keys_and_gradients(model, tok, spec, modules, facts, batch=target_batch(tok, facts[:1], "cpu"),
                           positions="subject")


def test_subject_positions_no_loss_reaches_leave_the_editor_finite_and_the_pack_without_that_module(tmp_path):
    """At the model's last layer a subject inside its prompt gets no gradient: training batches with no row there
    leave the normalisation statistics as they were (they became NaN), an edit leaves that module out (a rank-0
    adapter module would not load), and an editor with no module a loss reaches refuses to make an empty edit."""
    neighbour = [("the famous louvre is in", "paris")]
    records = [editpack.make_fact("the {} is in", s, CITIES[i % 6], CITIES[(i + 1) % 6],
                                  paraphrases=[f"the big {s} is in"], neighborhood=neighbour)
               for i, s in enumerate(SUBJECTS * 3)]
    model, tok = tiny_model("llama"), tiny_tokenizer()
    run = settings(max_steps=4, eval_every=2, checkpoint_every=2)
    editor = editpack.train(model, "mend", records, tokenizer=tok, settings=run, progress=False, name="mend-subject",
                            positions="subject", **SMALL)  # layers 2 and 3, the last
    assert all(torch.isfinite(t).all() for t in editor.tensors.values())
    pack = edit(model, records[:2], "mend", tokenizer=tok, editor=str(editor.save(tmp_path / "editor")))
    assert list(pack.delta.modules) == ["model.layers.2.mlp.down_proj"]
    assert list(editpack.load_pack(pack.save(tmp_path / "pack")).delta.modules) == ["model.layers.2.mlp.down_proj"]
    last = editpack.train(model, "mend", records, tokenizer=tok, settings=run, progress=False, name="mend-last",
                          positions="subject", layers=[3], rank=16)
    with pytest.raises(EditpackError, match="no loss reaches them .*nothing to edit"):
        edit(model, records[:2], "mend", tokenizer=tok, editor=str(last.save(tmp_path / "last")))


@pytest.mark.parametrize("at", ["answer", "all"])
def test_the_locality_kl_is_taken_where_locality_at_says(at):
    """``answer``: the KL at each neighbourhood prompt's last real token only (padding never counts)."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    facts = [editpack.make_fact("the famous {}", "tower", "paris", "rome", neighborhood=[(p, "paris")])
             for p in ("the famous louvre", "the old big red museum of the famous louvre")]
    learner = MENDLearner(model, tok, editpack.spec_for(model), ["model.layers.2.mlp.down_proj"],
                          MENDConfig(locality_at=at, rank=8))
    local = learner._locality_batch(facts)
    lengths = local["attention_mask"].sum(1)
    assert lengths[0] < lengths[1]
    if at == "all":
        assert torch.equal(local["counted"], local["attention_mask"].bool())
    else:
        assert local["counted"].sum(1).tolist() == [1, 1]
        assert local["counted"].nonzero()[:, 1].tolist() == (lengths - 1).tolist()


def test_training_resumes_from_its_checkpoint_to_the_same_editor(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    whole = editpack.train(model, "mend", RECORDS, tokenizer=tok, settings=settings(checkpoint_every=5), progress=False,
                           **SMALL)

    calls = {"n": 0}
    original_loss = editpack.methods.mend.method.MENDLearner.loss

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return original_loss(self, batch)

    checkpoint = tmp_path / "ckpt"
    editpack.methods.mend.method.MENDLearner.loss = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            editpack.train(model, "mend", RECORDS, tokenizer=tok, settings=settings(checkpoint_every=5), progress=False,
                           checkpoint_dir=checkpoint, **SMALL)
    finally:
        editpack.methods.mend.method.MENDLearner.loss = original_loss
    assert json.loads((checkpoint / "trainer.json").read_text())["step"] == 10
    resumed = editpack.train(model, "mend", RECORDS, tokenizer=tok, settings=settings(checkpoint_every=5), progress=False,
                             checkpoint_dir=checkpoint, **SMALL)
    assert resumed.training["resumed_from"] == 10
    for key, tensor in whole.tensors.items():
        torch.testing.assert_close(resumed.tensors[key], tensor, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="other settings"):
        editpack.train(model, "mend", RECORDS, tokenizer=tok, settings=settings(checkpoint_every=5, lr=1e-2), progress=False,
                       checkpoint_dir=checkpoint, **SMALL)
    # The method's settings and the records are part of what a checkpoint resumes.
    with pytest.raises(ValueError, match=r"other settings \(identity.config\)"):
        editpack.train(model, "mend", RECORDS, tokenizer=tok, settings=settings(checkpoint_every=5), progress=False,
                       checkpoint_dir=checkpoint, **{**SMALL, "locality_at": "all"})
    with pytest.raises(ValueError, match=r"other settings \(identity.records\)"):
        editpack.train(model, "mend", RECORDS[:-1], tokenizer=tok, settings=settings(checkpoint_every=5),
                       progress=False, checkpoint_dir=checkpoint, **SMALL)


def test_editor_checks(trained, tmp_path):
    model, tok, editor = trained
    path = editor.save(tmp_path / "editor")
    other = tiny_model("llama", seed=1)
    with pytest.raises(EditpackError, match="was trained for"):
        edit(other, FACT, "mend", tokenizer=tok, editor=str(path))
    with pytest.raises(EditpackError, match="trained editor"):
        edit(model, FACT, "mend", tokenizer=tok)
    with pytest.raises(EditpackError, match="not the one recorded"):
        edit(model, FACT, "mend", tokenizer=tok, editor=str(path), editor_content="sha256:" + "0" * 64)
    with pytest.raises(PackFormatError, match="changes no model by itself"):
        apply(model, str(path))
    with pytest.raises(EditpackError, match="learns nothing"):
        editpack.train(model, "rome", RECORDS, tokenizer=tok)
    manifest = json.loads((path / "editpack.json").read_text())
    manifest["editor"]["content"] = "sha256:" + "1" * 64
    (path / "editpack.json").write_text(json.dumps(manifest))
    with pytest.raises(PackFormatError):
        editpack.load_pack(path)


def test_editor_round_trips_through_the_hub_and_edits_byte_identically(trained, hub, tmp_path):
    model, tok, editor = trained
    path = editor.save(tmp_path / "editor")
    editpack.push(path, "team/mend-tiny")
    assert [v.version for v in editpack.versions("team/mend-tiny")] == ["1.0.0"]
    pulled = editpack.pull("team/mend-tiny@1.0.0")
    assert isinstance(pulled, Editor) and pulled.content_id == editor.content_id
    local = edit(model, FACT, "mend", tokenizer=tok, editor=str(path))
    remote = edit(model, FACT, "mend", tokenizer=tok, editor="team/mend-tiny@1.0.0")
    assert remote.hyperparameters["editor"] == "team/mend-tiny@1.0.0"
    assert local.delta_content == remote.delta_content


def test_cli_trains_an_editor_and_edits_with_it(tiny_dir, tmp_path):
    import os

    from conftest import run_cli_quietly

    data = tmp_path / "records.jsonl"
    data.write_text("\n".join(json.dumps(f.to_dict()) for f in RECORDS))
    env = dict(os.environ, EDITPACK_HOME=str(tmp_path / "home"))
    out = tmp_path / "editors" / "mend-tiny"
    commands = [
        ["train", "mend", "--model", str(tiny_dir), "--data", str(data), "--max-steps", "6", "--batch-size", "4",
         "--held-out", "4", "--eval-every", "3", "--layers", "2,3", "--set", "rank=8", "--set", "steps=2", "--lr",
         "1e-3", "-o", str(out)],
        ["show", str(out)],
    ]
    outputs = run_cli_quietly(commands, env)
    assert "wrote mend-" in outputs[0] and "4 held out; 6 steps" in outputs[0]
    assert not (tmp_path / "editors" / "mend-tiny.checkpoint").exists()
    assert "editor" in outputs[1]
    # A six-step editor on a random model need not move the answer: editpack's own warning may follow.
    made = CliRunner().invoke(main, ["edit", "--model", str(tiny_dir), "--method", "mend", "--editor", str(out),
                                     "--prompt", "the famous eiffel tower", "--subject", "eiffel tower", "--target",
                                     "rome", "--no-eval", "-o", str(tmp_path / "pack")])
    assert made.exit_code == 0 and "(1 fact(s), mend)" in made.output, made.output
    made_pack = editpack.load_pack(tmp_path / "pack")
    assert made_pack.hyperparameters["editor"].startswith("mend-")
    assert made_pack.hyperparameters["steps"] == 2  # the editor's, trained with --set steps=2


def test_train_mend_with_no_settings_trains_the_measured_recipe(tmp_path):
    """``editpack train mend`` with no ``--set`` trains the recipe that met every target on SmolLM2 (the subject's
    last token at the architecture's middle ``run`` layers, an initial step of 1e-3, two edit steps) and the
    editor records it."""
    folder = tmp_path / "tiny"
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    data = tmp_path / "records.json"
    data.write_text(json.dumps([r.to_dict() for r in RECORDS[:8]]))
    result = CliRunner().invoke(main, ["train", "mend", "--model", str(folder), "--data", str(data), "--max-steps", "2",
                                       "--held-out", "2", "--eval-every", "1", "--batch-size", "2", "--set", "rank=16",
                                       "-o", str(tmp_path / "editor")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    editor = editpack.load_pack(tmp_path / "editor")
    assert editor.hyperparameters["steps"] == 2 and editor.hyperparameters["positions"] == "subject"
    assert editor.hyperparameters["edit_lr"] == 1e-3
    run = editpack.spec_for(model).role_layers("run", model)
    assert editor.trained_modules == [f"model.layers.{layer}.mlp.down_proj" for layer in run]
