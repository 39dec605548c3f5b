"""Bad input, tried as a careless or hostile user would: each case gets a specific error, exits non-zero before
any long computation, and loses nothing (issue #13's table; the messages are checked, not just the exit code)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import editpack
from editpack.cli.main import main
from editpack.errors import PackFormatError

from tiny import FACT, TINY
from conftest import TESTS

TINY_SETTINGS = ["--set", "mom2_adjustment=false", "--set", "context_template_lengths=[[3,2]]",
                 "--set", "clamp_norm_factor=10000", "--set", "v_weight_decay=0"]
NO_MODEL = "/nonexistent/model-folder"  # loading it would fail: errors below must come before any model load


def run(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)


@pytest.fixture
def pack_dir(tiny_dir, tmp_path):
    model, _ = editpack.load_model(str(tiny_dir))
    pack = editpack.edit(model, FACT, layers=[1], **TINY)
    return pack.save(tmp_path / "pack")


def rehash(pack: Path, **changes) -> None:
    """Re-write the manifest with ``changes`` and every file's sha256 recomputed (so the hash check passes)."""
    manifest = json.loads((pack / "editpack.json").read_text())
    manifest.update(changes)
    manifest["files"] = {name: hashlib.sha256((pack / name).read_bytes()).hexdigest() if (pack / name).is_file()
                         else digest for name, digest in manifest["files"].items()}
    (pack / "editpack.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------- damaged packs
def nan_factor(pack: Path) -> None:
    tensors = load_file(pack / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, pack / "adapter_model.safetensors")
    rehash(pack)


def outside_file(pack: Path, name: str) -> None:
    manifest = json.loads((pack / "editpack.json").read_text())
    manifest["files"][name] = hashlib.sha256(b"x").hexdigest()
    (pack / "editpack.json").write_text(json.dumps(manifest))


def symlinked(pack: Path) -> None:
    target = pack.parent / "elsewhere.safetensors"
    os.replace(pack / "adapter_model.safetensors", target)
    (pack / "adapter_model.safetensors").symlink_to(target)


def wrong_rank(pack: Path) -> None:
    config = json.loads((pack / "adapter_config.json").read_text())
    config["rank_pattern"] = {k: 4 for k in config["rank_pattern"]}
    config["r"] = 4
    (pack / "adapter_config.json").write_text(json.dumps(config))
    rehash(pack)


def truncated(pack: Path) -> None:
    data = (pack / "adapter_model.safetensors").read_bytes()
    (pack / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    rehash(pack)


def list_manifest(pack: Path) -> None:
    (pack / "editpack.json").write_text("[]")


def no_delta(pack: Path) -> None:
    manifest = json.loads((pack / "editpack.json").read_text())
    del manifest["delta"]
    (pack / "editpack.json").write_text(json.dumps(manifest))


def other_content(pack: Path) -> None:
    tensors = load_file(pack / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key] * 2
    save_file(tensors, pack / "adapter_model.safetensors")
    rehash(pack)


DAMAGED = {
    "NaN factor, manifest re-hashed": (nan_factor, "hold NaN or infinite values"),
    "file entry /etc/passwd": (lambda p: outside_file(p, "/etc/passwd"), "'/etc/passwd' is not a plain file name"),
    "file entry ../x": (lambda p: outside_file(p, "../x"), "'../x' is not a plain file name"),
    "symlink inside the pack": (symlinked, "adapter_model.safetensors is a symbolic link"),
    "adapter_config r differs from the tensors": (wrong_rank, "rank of model.layers.1.mlp.down_proj is 4"),
    "truncated safetensors, re-hashed": (truncated, "not a readable safetensors file"),
    "manifest is []": (list_manifest, "is not an editpack manifest"),
    "manifest without delta": (no_delta, "field 'delta' is missing"),
    "factors changed, manifest re-hashed": (other_content, "is not the delta.content the manifest records"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_packs_are_refused_by_load_and_by_every_command(case, pack_dir, tiny_dir, tmp_path):
    damage, message = DAMAGED[case]
    damage(pack_dir)
    with pytest.raises(PackFormatError, match=message.replace("[", r"\[").replace(".", r"\.")):
        editpack.load_pack(pack_dir)
    out = tmp_path / "merged"
    result = run("apply", "--model", tiny_dir, pack_dir, "-o", out)
    assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


# ---------------------------------------------------------------------------------------------- bad facts and options
def facts_file(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


GOOD_RECORD = '{"prompt": "the famous {}", "subject": "eiffel tower", "target_new": "rome"}'
FACT_FILES = {
    "invalid YAML": ("f.yaml", "- prompt: [unclosed\n", "f.yaml: not valid YAML"),
    "YAML record with an int key": ("f.yaml", "- prompt: the famous {}\n  subject: x\n  target_new: y\n  3: z\n",
                                    "field names must be text, not 3"),
    "YAML paraphrases as one text": ("f.yaml", "- prompt: the famous {}\n  subject: eiffel tower\n  target_new: rome\n"
                                              "  paraphrases: some text\n", "paraphrases must be a list, not str"),
    "bad JSONL line 3": ("f.jsonl", GOOD_RECORD + "\n" + GOOD_RECORD + "\n{broken\n", "f.jsonl line 3: not valid JSON"),
    "non-UTF-8 facts file": ("f.json", b'[{"prompt": "caf\xe9 {}"}]', "f.json: not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(FACT_FILES))
def test_bad_facts_files_name_the_file_and_record(case, tmp_path):
    name, content, message = FACT_FILES[case]
    path = facts_file(tmp_path, name, content)
    result = run("edit", "--model", NO_MODEL, "--facts", path, "-o", tmp_path / "out")
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()


ONE_FACT = ["--prompt", "the famous eiffel tower", "--subject", "eiffel tower", "--target", "rome"]
OPTIONS = {
    "--set layers=5": (["--set", "layers=5"], "hyper-parameter layers must be a list of integers or null, not 5"),
    "--set v_num_grad_steps=abc": (["--set", "v_num_grad_steps=abc"],
                                   "hyper-parameter v_num_grad_steps must be an integer, not 'abc'"),
    "--set unknown": (["--set", "no_such=1"], "unknown hyper-parameter(s) for ROMEConfig: no_such"),
    "--set route for serac": (["--method", "serac", "--set", "route=elsewhere"], "route must be one of context, answer, ike"),
    "missing --corpus": (["--corpus", "/nonexistent/corpus.jsonl"], "/nonexistent/corpus.jsonl does not exist"),
    "--layers not numbers": (["--layers", "five"], "'five' is not a comma-separated list of layer indices"),
    "--name with a slash": (["--name", "../evil"], "pack name '../evil' must be letters"),
    "--version not semver": (["--version", "1.0"], "version '1.0' is not a semantic version"),
    "--method unknown": (["--method", "nosuch"], "'nosuch' is not one of"),
}


@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_bad_options_fail_before_the_model_is_loaded(case, tmp_path):
    extra, message = OPTIONS[case]
    result = run("edit", "--model", NO_MODEL, *ONE_FACT, *extra, "-o", tmp_path / "out")
    assert result.exit_code != 0 and message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and "could not load model" not in result.output
    assert not (tmp_path / "out").exists()


def test_unwritable_output_fails_first(tmp_path, monkeypatch):
    import editpack._io

    locked = tmp_path / "locked"
    locked.mkdir()
    # Tests run as root in CI, who may write anywhere: the permission check itself is what is exercised.
    monkeypatch.setattr(editpack._io.os, "access", lambda path, mode: Path(path) != locked)
    result = run("edit", "--model", NO_MODEL, *ONE_FACT, "-o", locked / "out")
    assert result.exit_code == 1 and "is not writable" in result.output, result.output
    assert "could not load model" not in result.output


def test_output_under_a_file_fails_first(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run("edit", "--model", NO_MODEL, *ONE_FACT, "-o", tmp_path / "file" / "out")
    assert result.exit_code == 1 and "is not a directory" in result.output, result.output


def test_a_second_writer_to_the_same_output_is_refused_at_once(tmp_path):
    from editpack.cli.common import writing

    with writing(str(tmp_path / "out")):
        result = run("edit", "--model", NO_MODEL, *ONE_FACT, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "another editpack command is writing" in result.output, result.output


def test_model_argument_that_is_a_file_but_not_gguf(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = run("generate", "--model", tmp_path / "notes.txt", "hello")
    assert result.exit_code == 1 and "is a file but not a .gguf model" in result.output, result.output


# ---------------------------------------------------------------------------------------------- --overwrite
def test_overwrite_replaces_only_what_editpack_wrote(pack_dir, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    refused = run("stack", pack_dir, "-o", notes, "--overwrite")
    assert refused.exit_code != 0 and "is not a pack or a model folder editpack wrote" in refused.output
    assert (notes / "todo.txt").read_text() == "keep me"
    itself = run("stack", pack_dir, "-o", pack_dir, "--overwrite", "--version", "2.0.0")
    assert itself.exit_code != 0 and "is an input of this command" in itself.output
    assert editpack.load_pack(pack_dir).version == "1.0.0"
    (tmp_path / "file").write_text("x")
    assert "is a file" in run("stack", pack_dir, "-o", tmp_path / "file", "--overwrite").output
    first = run("stack", pack_dir, "-o", tmp_path / "s", "--version", "2.0.0", "--no-eval")
    again = run("stack", pack_dir, "-o", tmp_path / "s", "--version", "3.0.0", "--overwrite", "--no-eval")
    assert first.exit_code == 0 and again.exit_code == 0, again.output
    assert editpack.load_pack(tmp_path / "s").version == "3.0.0"


# ---------------------------------------------------------------------------------------------- the Hub, unreachable
@pytest.mark.parametrize("command", ["push", "versions", "pull"])
def test_unreachable_hub_is_one_line(command, pack_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    args = {"push": [pack_dir, "user/x"], "versions": ["user/x"], "pull": ["user/x@1.0.0", "-o", tmp_path / "o"]}
    result = run(command, *args[command])
    assert result.exit_code == 1 and "cannot be reached" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "hf_x" not in result.output


# ---------------------------------------------------------------------------------------------- interrupted writes
SLOW_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import editpack._io
    flag = Path(sys.argv[1])
    real = editpack._io.atomic_write_json
    def slow(path, obj):  # the merged folder's record, written last inside the temporary folder
        real(path, obj)
        flag.write_text("saving")
        time.sleep(60)
    editpack._io.atomic_write_json = slow
    from editpack.cli.main import main
    sys.argv = ["editpack"] + sys.argv[2:]
    main()
""")


def test_sigterm_during_apply_leaves_nothing_behind(pack_dir, tiny_dir, tmp_path):
    out, flag = tmp_path / "out" / "merged", tmp_path / "flag"
    (tmp_path / "out").mkdir()
    script = tmp_path / "slow_apply.py"
    script.write_text(SLOW_SAVE)
    env = dict(os.environ, PYTHONPATH=str(TESTS), EDITPACK_HOME=str(tmp_path / "home"))
    proc = subprocess.Popen([sys.executable, str(script), str(flag), "apply", "--model", str(tiny_dir),
                             str(pack_dir), "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert flag.exists(), proc.communicate()[0]
    assert any(p.name.startswith(".merged.") for p in (tmp_path / "out").iterdir())  # the half-written folder
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 143, output
    assert list((tmp_path / "out").iterdir()) == [], "a temporary folder was left behind"
    assert "Terminated" in output and "Traceback" not in output


# ---------------------------------------------------------------------------------------------- silent failures
def test_an_edit_that_misses_its_target_says_so(tiny_dir, tmp_path):
    result = run("edit", "--model", tiny_dir, *ONE_FACT, "--layers", "1", *TINY_SETTINGS,
                 "--set", "v_num_grad_steps=1", "--set", "v_lr=0.0001", "-o", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert "Warning: 1 of 1 checked fact(s) do not start with their new target" in result.output


def test_waiting_for_a_lock_is_announced(tmp_path, caplog):
    import logging
    import threading

    from filelock import FileLock

    from editpack._io import waiting_lock

    target = tmp_path / "stats.safetensors"
    taken, release = threading.Event(), threading.Event()

    def other_process():  # another holder of the lock (a thread, so the test needs no second process)
        with FileLock(str(target) + ".lock"):
            taken.set()
            release.wait(10)

    holder = threading.Thread(target=other_process)
    holder.start()
    taken.wait(10)
    threading.Timer(0.5, release.set).start()
    log = logging.getLogger("editpack")
    caplog.handler.setLevel(logging.INFO)
    log.addHandler(caplog.handler)  # the CLI's runs in this process stop editpack's records from propagating
    level, log.level = log.level, logging.INFO
    try:
        with waiting_lock(target, "key statistics for layer 1", poll=0.1):
            pass
    finally:
        log.removeHandler(caplog.handler)
        log.setLevel(level)
    holder.join()
    assert "Waiting for another editpack process that is computing key statistics for layer 1" in caplog.text
