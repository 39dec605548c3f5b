"""Bad input, the third round (issue #39): every case that lost data, succeeded wrongly, answered late or with a
traceback, or printed a library's line. Each test fails on the code before the round; each records the message
the case gets now, and the run prints them as one table (``tests/casebook.py``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import editpack
from casebook import record
from editpack.export.merged import export_merged
from editpack.errors import InvalidFactError, PackConflictError, PackFormatError
from test_bad_input import NO_MODEL, ONE_FACT, TINY_SETTINGS, nan_factor, rehash, run
from tiny import FACT, TINY

LOSS, SILENT, LATE, MESSAGE, NOISE, HUB = ("LOSS", "SILENT-WRONG", "LATE/TRACEBACK", "MESSAGE", "NOISE", "HUB")


def refused(result, *needles, code=None):
    """The command failed with one clear line (no traceback) that holds every needle; returns that message."""
    text = " ".join(result.output.split())
    assert result.exit_code != 0 and (code is None or result.exit_code == code), result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    for needle in needles:
        assert needle in text, result.output
    return result.output.strip().splitlines()[-1] if result.output.strip() else ""


def digest(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def pack_dir(tiny_dir, tmp_path):
    model, _ = editpack.load_model(str(tiny_dir))
    return editpack.edit(model, FACT, layers=[1], **TINY).save(tmp_path / "pack")


@pytest.fixture
def other_pack(tiny_dir, tmp_path):
    """A second pack on the tiny model setting the same fact as ``pack_dir`` to another target (a conflict)."""
    model, _ = editpack.load_model(str(tiny_dir))
    pack = editpack.edit(model, editpack.make_fact("the famous {}", "eiffel tower", "berlin"), layers=[1],
                         name="other", **TINY)
    return pack.save(tmp_path / "other")


# ---------------------------------------------------------------------------------------------- loss
def test_gguf_overwrite_never_replaces_a_users_file(pack_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    result = run("export", pack_dir, "--to", "gguf", "-o", notes, "--overwrite")
    record(LOSS, "export --to gguf -o notes.txt --overwrite", "refused",
           refused(result, "is not a GGUF file editpack wrote"))
    assert notes.read_text() == "my notes"
    first = run("export", pack_dir, "--to", "gguf", "-o", tmp_path / "a.gguf")
    again = run("export", pack_dir, "--to", "gguf", "-o", tmp_path / "a.gguf", "--overwrite")
    assert first.exit_code == 0 and again.exit_code == 0, again.output  # its own export it still replaces


def test_gguf_export_never_writes_inside_its_input_pack(pack_dir):
    before = digest(pack_dir)
    result = run("export", pack_dir, "--to", "gguf", "-o", pack_dir / "adapter_model.safetensors", "--overwrite")
    record(LOSS, "export --to gguf -o PACK/adapter_model.safetensors --overwrite", "refused",
           refused(result, "inside", "an input of this export"))
    assert digest(pack_dir) == before and editpack.load_pack(pack_dir)


def test_apply_never_overwrites_its_own_model_folder(pack_dir, tiny_dir):
    before = digest(tiny_dir)
    result = run("apply", pack_dir, "--model", tiny_dir, "-o", tiny_dir, "--overwrite", "--force")
    record(LOSS, "apply PACK --model M -o M --overwrite --force", "refused",
           refused(result, "is an input of this command"))
    assert digest(tiny_dir) == before
    with pytest.raises(editpack.EditpackError, match="is the folder model"):  # the library refuses it too
        model, _ = editpack.load_model(str(tiny_dir))
        export_merged(model, pack_dir, tiny_dir, overwrite=True)
    assert digest(tiny_dir) == before


def test_apply_never_writes_into_the_converted_model_cache(pack_dir, tiny_dir, isolated_home):
    cached = isolated_home / "models" / "smollm2-135m"
    cached.mkdir(parents=True)
    (cached / "editpack_source.json").write_text("{}")  # what a converted built-in holds
    result = run("apply", pack_dir, "--model", tiny_dir, "-o", cached, "--overwrite", "--force")
    record(LOSS, "apply -o <cache>/models/smollm2-135m --overwrite", "refused",
           refused(result, "inside editpack's cache of converted models"))
    assert [p.name for p in cached.iterdir()] == ["editpack_source.json"]


# ---------------------------------------------------------------------------------------------- silently wrong
def test_a_pack_given_twice_is_refused_by_stack_export_and_apply(pack_dir, tiny_dir, tmp_path):
    for command, args in (("stack", ["-o", tmp_path / "s", "--no-eval"]),
                          ("export", ["--to", "vllm", "-o", tmp_path / "v"]),
                          ("export", ["--to", "gguf", "-o", tmp_path / "g.gguf"]),
                          ("apply", ["--model", tiny_dir, "-o", tmp_path / "m"]),
                          ("generate", ["--model", tiny_dir, "--pack", pack_dir])):
        result = run(command, pack_dir, pack_dir, *args) if command != "generate" else run(command, *args, "--pack",
                                                                                            pack_dir, "x")
        what = f"{command} --to {args[1]}" if command == "export" else command
        record(SILENT, f"{what} P P", "refused", refused(result, "is given twice"))
    assert not any((tmp_path / name).exists() for name in ("s", "v", "g.gguf", "m"))
    with pytest.raises(PackConflictError, match="given twice"):
        editpack.stack([pack_dir, pack_dir])


def test_export_refuses_conflicting_packs_as_generate_and_apply_do(pack_dir, other_pack, tmp_path):
    for target, out in (("vllm", tmp_path / "v"), ("gguf", tmp_path / "g.gguf")):
        result = run("export", pack_dir, other_pack, "--to", target, "-o", out)
        record(SILENT, f"export --to {target} of two conflicting packs", "refused",
               refused(result, "conflicting packs", "--later-wins"))
        assert not out.exists()
    later = run("export", pack_dir, other_pack, "--to", "vllm", "-o", tmp_path / "v", "--later-wins")
    assert later.exit_code == 0, later.output
    record_ = json.loads((tmp_path / "v" / "editpack_export.json").read_text())
    assert [p["name"] for p in record_["packs"]] == ["other"]  # the earlier, wholly overridden pack is left out


def test_a_manifest_whose_base_fingerprint_was_changed_is_refused(pack_dir, tiny_dir, tmp_path):
    manifest = json.loads((pack_dir / "editpack.json").read_text())
    manifest["base_model"]["fingerprint"] = "sha256:" + "0" * 64
    (pack_dir / "editpack.json").write_text(json.dumps(manifest))
    for command, args in (("apply", [pack_dir, "--model", tiny_dir, "-o", tmp_path / "m"]),
                          ("stack", [pack_dir, "-o", tmp_path / "s", "--no-eval"]),
                          ("generate", ["--model", tiny_dir, "--pack", pack_dir, "x"])):
        result = run(command, *args)
        record(SILENT, f"{command} of a pack whose base_model.fingerprint was changed", "refused",
               refused(result, "is not the combination of its module fingerprints"))
    shown = run("show", pack_dir)
    assert shown.exit_code == 1 and "verified: NO" in shown.output


def test_contradictory_facts_in_one_file_are_refused_before_the_model_loads(tiny_dir, tmp_path):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "the famous {}", "subject": "eiffel tower", "target_new": "rome"},
                                 {"prompt": "the famous {}", "subject": "Eiffel Tower", "target_new": "berlin"}]))
    result = run("edit", "--model", NO_MODEL, "--facts", facts, "-o", tmp_path / "out")
    record(SILENT, "two facts with the same subject and prompt, two targets", "refused",
           refused(result, "facts 0 and 1 contradict each other"))
    assert "could not load model" not in result.output and not (tmp_path / "out").exists()
    with pytest.raises(InvalidFactError, match="contradict"):  # the library refuses them as well
        editpack.edit(editpack.load_model(str(tiny_dir))[0], json.loads(facts.read_text()), layers=[1], **TINY)


def show_damage(kind, pack: Path) -> None:
    if kind == "NaN factor":
        nan_factor(pack)
    elif kind == "rank -3":
        config = json.loads((pack / "adapter_config.json").read_text())
        config["r"], config["rank_pattern"] = -3, {k: -3 for k in config["rank_pattern"]}
        (pack / "adapter_config.json").write_text(json.dumps(config))
        rehash(pack)
    elif kind == "delta null":
        manifest = json.loads((pack / "editpack.json").read_text())
        manifest["delta"] = None
        (pack / "editpack.json").write_text(json.dumps(manifest))
    elif kind == "other fingerprint":
        manifest = json.loads((pack / "editpack.json").read_text())
        manifest["base_model"]["fingerprint"] = "sha256:" + "1" * 64
        (pack / "editpack.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["NaN factor", "rank -3", "delta null", "other fingerprint"])
def test_show_verifies_what_verify_verifies(kind, pack_dir):
    show_damage(kind, pack_dir)
    verify = run("verify", pack_dir)
    shown = run("show", pack_dir)
    assert verify.exit_code != 0
    assert shown.exit_code == 1 and "verified: NO" in shown.output and "verified: yes" not in shown.output
    problem = shown.output.split("verified: NO", 1)[1]
    record(SILENT, f"show of a pack with {kind}", "verified: NO", problem)
    as_json = json.loads(run("show", pack_dir, "--json").output)
    assert as_json["verified"] is False and as_json["problems"]


def absurd(pack: Path, value: float = 1e30) -> None:
    tensors = load_file(pack / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], value)
    save_file(tensors, pack / "adapter_model.safetensors")
    manifest = json.loads((pack / "editpack.json").read_text())
    manifest["delta"]["content"] = editpack.packs.weights.adapter_content_id(tensors)
    (pack / "editpack.json").write_text(json.dumps(manifest))
    rehash(pack)


def test_a_delta_that_swamps_its_weights_is_refused(pack_dir, tiny_dir, tmp_path):
    absurd(pack_dir)
    for command, args in (("verify", [pack_dir]), ("export", [pack_dir, "--to", "vllm", "-o", tmp_path / "v"]),
                          ("generate", ["--model", tiny_dir, "--pack", pack_dir, "x"])):
        result = run(command, *args)
        record(SILENT, f"{command} of a pack with lora_B = 1e30 (re-hashed)", "refused",
               refused(result, "times the norm of the weight it edits"))
    assert not (tmp_path / "v").exists()
    # Without a recorded norm (packs made before it was recorded), the model's own weight bounds it when applied.
    manifest = json.loads((pack_dir / "editpack.json").read_text())
    del manifest["base_model"]["norms"]
    (pack_dir / "editpack.json").write_text(json.dumps(manifest))
    pack = editpack.load_pack(pack_dir)
    model, _ = editpack.load_model(str(tiny_dir))
    for check in (True, False):
        with pytest.raises(PackFormatError, match="this model's"):
            editpack.apply(model, pack, check=check)
    assert not editpack.applied(model)


def test_the_playground_reads_only_what_the_manifest_lists_at_every_read(tiny_dir, tmp_path, isolated_home):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from editpack.ui import Playground
    from editpack.ui.app import allowed_hosts, create_app

    model, tok = editpack.load_model(str(tiny_dir))
    editpack.edit(model, FACT, layers=[1], name="existing", **TINY).save(tmp_path / "packs" / "existing")
    playground = Playground(model, tok, tmp_path / "packs", evaluate=False)
    client = TestClient(create_app(playground, hosts=allowed_hosts("127.0.0.1")), base_url="http://127.0.0.1:7860")
    assert client.get("/api/card", params={"key": "folder:existing"}).status_code == 200
    card = tmp_path / "packs" / "existing" / "README.md"
    card.unlink()
    card.symlink_to("/etc/passwd")  # swapped after the pack was loaded
    answer = client.get("/api/file", params={"key": "folder:existing", "name": "README.md"})
    assert answer.status_code == 400 and "root:" not in answer.text
    assert client.get("/api/card", params={"key": "folder:existing"}).status_code == 400
    record(SILENT, "playground: a pack file swapped for a link to /etc/passwd after loading", "refused",
           answer.json()["error"])
    card.unlink()
    card.write_text("other text")  # or for other content
    assert "changed since the pack was loaded" in client.get("/api/card", params={"key": "folder:existing"}).text
    rebound = client.get("/api/packs", headers={"Host": "evil.example:7860"})
    assert rebound.status_code == 400 and client.get("/api/packs").status_code == 200
    record(SILENT, "playground: a request with Host evil.example (DNS rebinding)", "refused", rebound.text)


def test_max_memory_without_a_device_map_is_refused(tiny_dir):
    result = run("generate", "--model", tiny_dir, "--max-memory", "cpu=1GiB", "x")
    record(SILENT, "--max-memory without --device-map", "refused",
           refused(result, "--max-memory takes effect only with --device-map", code=2))
    result = run("generate", "--model", tiny_dir, "--offload-folder", "off", "x")
    refused(result, "--offload-folder takes effect only with --device-map", code=2)


def copy_with(pack: Path, out: Path, **changes) -> Path:
    shutil.copytree(pack, out)
    manifest = json.loads((out / "editpack.json").read_text())
    manifest.update(changes)
    (out / "editpack.json").write_text(json.dumps(manifest))
    return out


def test_diff_counts_every_fact(pack_dir, tmp_path):
    facts = json.loads((pack_dir / "editpack.json").read_text())["facts"]
    two = [{"prompt": "the tower {}", "subject": "louvre", "target_new": "tokyo", "relation": "P17"},
           {"prompt": "the old {}", "subject": "louvre", "target_new": "tokyo", "relation": "P17"}]  # two phrasings
    newer = copy_with(pack_dir, tmp_path / "newer", facts=facts + two, version="1.1.0")
    found = json.loads(run("diff", pack_dir, newer, "--json").output)
    assert len(found["added"]) == 2 and not found["replaced"] and not found["removed"], found
    record(SILENT, "diff of a version adding two facts of one subject and relation", "correct",
           f"facts: 1 → 3 (+{len(found['added'])} ~0 -0)")


def test_log_orders_equal_versions_oldest_first(pack_dir, tmp_path):
    folder = tmp_path / "versions"
    folder.mkdir()
    copy_with(pack_dir, folder / "b-old", created="2026-01-01T00:00:00+00:00")
    copy_with(pack_dir, folder / "a-new", created="2026-06-01T00:00:00+00:00")
    entries = json.loads(run("log", folder, "--json").output)
    assert [e["created"][:7] for e in entries] == ["2026-01", "2026-06"]
    record(SILENT, "log of two packs with the same version", "correct", "oldest first (by creation time)")


# ---------------------------------------------------------------------------------------------- late or traceback
def test_an_output_nothing_can_be_created_in_is_refused_before_the_model_loads(tmp_path):
    if not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    result = run("edit", "--model", NO_MODEL, *ONE_FACT, "-o", "/proc/x")
    record(LATE, "edit -o /proc/x", "refused first", refused(result, "nothing can be created in /proc"))
    assert "could not load model" not in result.output


RANGES = {
    "v_num_grad_steps=-5": ("rome", "hyper-parameter v_num_grad_steps must be at least 1, not -5"),
    "optimize_dtype=int8": ("rome", "optimize_dtype must be one of auto, float32, bfloat16, not 'int8'"),
    "lr=-0.1": ("ft", "hyper-parameter lr must be positive, not -0.1"),
    "v_lr=-1": ("memit", "hyper-parameter v_lr must be positive"),
    "stats_tokens=0": ("rome", "hyper-parameter stats_tokens must be at least 1, not 0"),
    "context_templates=[]": ("rome", "hyper-parameter context_templates must not be empty"),
    'context_templates=["no placeholder"]': ("rome", "each template must hold one {}"),
    "layers=[-1]": ("rome", "each layer index must be at least 0"),
    "v_lr=NaN": ("rome", "hyper-parameter v_lr must be a finite number, not nan"),
    "rank=0": ("lora", "hyper-parameter rank must be at least 1, not 0"),
}


@pytest.mark.parametrize("setting", sorted(RANGES))
def test_hyperparameter_ranges_are_checked_before_the_model_loads(setting, tmp_path):
    method, message = RANGES[setting]
    result = run("edit", "--model", NO_MODEL, *ONE_FACT, "--method", method, "--set", setting, "-o", tmp_path / "o")
    record(LATE, f"edit --method {method} --set {setting}", "refused first", refused(result, message))
    assert "could not load model" not in result.output and not (tmp_path / "o").exists()


def test_an_empty_prompt_is_refused(tiny_dir):
    result = run("generate", "--model", NO_MODEL, "")
    record(LATE, 'generate ""', "refused first", refused(result, "prompt 1 is empty", code=2))
    model, tok = editpack.load_model(str(tiny_dir))
    tok.add_bos_token = False
    tok._tokenizer.post_processor = None  # a tokenizer that adds no BOS: an empty prompt has no token at all
    with pytest.raises(ValueError, match="has no tokens"):
        editpack.generate(model, tok, ["x", ""])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA device")
def test_a_cuda_device_map_on_a_cpu_torch_is_refused(tiny_dir):
    result = run("generate", "--model", tiny_dir, "--device-map", "cuda:7", "x")
    record(LATE, "--device-map cuda:7 on a CPU torch", "refused first",
           refused(result, "this torch sees no CUDA device", code=2))
    refused(run("generate", "--model", tiny_dir, "--device-map", "gpu-please", "x"), "is neither a strategy")


def test_a_port_out_of_range_is_refused():
    result = run("ui", "--port", "99999")
    record(LATE, "ui --port 99999", "refused first", refused(result, "99999 is not in the range 1<=x<=65535", code=2))


# ---------------------------------------------------------------------------------------------- messages
def test_a_number_where_text_is_expected_says_so(tmp_path):
    facts = tmp_path / "f.json"
    facts.write_text(json.dumps([{"prompt": "the famous {}", "subject": 5, "target_new": "rome"}]))
    result = run("edit", "--model", NO_MODEL, "--facts", facts, "-o", tmp_path / "o")
    record(MESSAGE, "a number as a fact's subject", "refused", refused(result, "subject must be text, not int 5"))
    missing = tmp_path / "m.json"
    missing.write_text(json.dumps([{"prompt": "the famous {}", "target_new": "rome"}]))
    refused(run("edit", "--model", NO_MODEL, "--facts", missing, "-o", tmp_path / "o"), "subject is missing or empty")


@pytest.mark.parametrize("what", ["a directory", "/dev/null"])
def test_facts_that_are_not_a_regular_file_say_what_they_are(what, tmp_path):
    path = tmp_path if what == "a directory" else Path("/dev/null")
    if not path.exists():
        pytest.skip("no /dev/null")
    result = run("edit", "--model", NO_MODEL, "--facts", path, "-o", tmp_path / "o")
    needle = "is a directory" if what == "a directory" else "is not a regular file"
    record(MESSAGE, f"--facts {what}", "refused", refused(result, needle))
    assert "does not exist" not in result.output


def test_an_unknown_format_prefix_names_the_formats(tmp_path, test_data):
    result = run("edit", "--model", NO_MODEL, "--facts", f"cf:{test_data / 'counterfact-edit-25.json'}",
                 "-o", tmp_path / "o")
    record(MESSAGE, "--facts cf:FILE (unknown format prefix)", "refused",
           refused(result, "unknown facts format 'cf'", "native, counterfact, zsre, mquake"))
    assert "does not exist" not in result.output


def test_a_binary_corpus_names_the_file(tmp_path):
    corpus = tmp_path / "corpus.bin"
    corpus.write_bytes(bytes(range(256)) * 64)
    result = run("edit", "--model", NO_MODEL, *ONE_FACT, "--corpus", corpus, "-o", tmp_path / "o")
    record(MESSAGE, "--corpus a binary file", "refused", refused(result, str(corpus), "not UTF-8 text"))
    assert "could not load model" not in result.output


# ---------------------------------------------------------------------------------------------- noise and the Hub
def test_offline_commands_print_no_kernel_trust_line(pack_dir, tiny_dir, tmp_path):
    from conftest import REPO, run_cli_quietly

    env = dict(os.environ, HF_HUB_OFFLINE="1", EDITPACK_HOME=str(tmp_path / "home"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    fact = ["--prompt", "the famous eiffel tower", "--subject", "eiffel tower", "--target", "rome", "--layers", "1"]
    commands = [["edit", "--model", str(tiny_dir), *fact, *TINY_SETTINGS, "--no-eval", "-o", str(tmp_path / "e")],
                ["apply", str(pack_dir), "--model", str(tiny_dir), "-o", str(tmp_path / "m")],
                ["stack", str(pack_dir), "--no-eval", "-o", str(tmp_path / "s")],
                ["generate", "--model", str(tiny_dir), "--pack", str(pack_dir), "--max-new-tokens", "2", "x"]]
    run_cli_quietly(commands, env)  # asserts no "kernels-community" (nor any other library) line
    record(NOISE, "edit / apply / stack --no-eval / generate --pack with HF_HUB_OFFLINE=1", "quiet",
           "no 'Skipping publisher trust check' line")


def test_cards_link_an_adapter_to_its_base_model(pack_dir):
    from editpack.packs.card import card_matches, render_card

    pack = editpack.load_pack(pack_dir)
    pack.base.hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = render_card(pack)
    front = card.split("---")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in front and "base_model_relation: adapter" in front
    record(HUB, "card of a weight pack on a Hub model", "correct", "base_model_relation: adapter")
    older = "\n".join(line for line in card.split("\n") if line != "base_model_relation: adapter")
    assert card_matches(older, pack) and not card_matches(older + "x", pack)  # cards written before still verify
