"""The playground (editpack ui): its state and actions on a tiny model, and its JSON API through FastAPI."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

import editpack  # noqa: E402
from editpack.ui import Playground  # noqa: E402
from editpack.ui.app import create_app, render_card  # noqa: E402

from tiny import FACT, TINY, tiny_model, tiny_tokenizer  # noqa: E402


def wait(playground, job, timeout=120):
    deadline = time.monotonic() + timeout
    while not job.done:
        assert time.monotonic() < deadline, "edit did not finish"
        time.sleep(0.05)
    return job


@pytest.fixture
def playground(tmp_path, isolated_home):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.editpack_tokenizer = tok
    existing = editpack.edit(model, FACT, tokenizer=tok, layers=[1], name="existing", **TINY)
    existing.save(tmp_path / "packs" / "existing")
    (tmp_path / "packs" / "notes").mkdir()  # a folder that is not a pack is not offered
    return Playground(model, tok, tmp_path / "packs", evaluate=False)


def test_edit_in_the_background_saves_switches_on_and_changes_the_continuation(playground):
    prompt = "the famous berlin"
    assert [p["name"] for p in playground.listing()] == ["existing"]
    before = playground.compare(prompt, max_new_tokens=3)
    assert before["base"] == before["edited"] and before["packs"] == []
    job = wait(playground, playground.start_edit("the famous {}", "berlin", "tokyo", "rome", layers=[1], **TINY))
    assert job.error is None and job.phase == 2 and job.pack == "folder:rome-berlin"
    assert (playground.packs_dir / "rome-berlin" / "editpack.json").is_file()
    entry = playground.entry("folder:rome-berlin")
    assert entry.on and entry.pack.facts[0].target_new == "tokyo"
    after = playground.compare(prompt, max_new_tokens=3)
    assert after["packs"] == ["rome-berlin@1.0.0"] and after["base"] == before["base"]
    assert after["edited"].split()[0] == "tokyo"
    playground.switch("folder:rome-berlin", False)
    assert playground.compare(prompt, max_new_tokens=3)["edited"] == before["base"]
    # The model is never left carrying a pack.
    assert not editpack.applied(playground.model)
    # A second edit of the same subject gets a new folder, never overwriting the first.
    again = wait(playground, playground.start_edit("the famous {}", "berlin", "tokyo", "rome", layers=[1], **TINY))
    assert again.pack == "folder:rome-berlin-2"


def test_bad_edits_fail_early_or_report_in_the_job(playground):
    with pytest.raises(editpack.EditpackError):
        playground.start_edit("the famous {}", "berlin", "tokyo", "no-such-method")
    with pytest.raises(Exception, match="subject"):
        playground.start_edit("the famous", "", "tokyo")
    job = wait(playground, playground.start_edit("the famous {}", "berlin", "tokyo", "rome", layers=[99], **TINY))
    assert job.done and "outside" in job.error and job.pack is None
    assert sorted(p.name for p in playground.packs_dir.iterdir()) == ["existing", "notes"]  # nothing half-written


def test_cards_render_without_raw_html_and_only_listed_files_are_served(playground):
    html = render_card("# Title\n\n<script>alert(1)</script>\n\n![chart](evaluation.png)", "folder:x")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'src="/api/file?key=folder%3Ax&amp;name=evaluation.png"' in html
    assert "existing" in playground.card("folder:existing")
    with pytest.raises(KeyError):
        playground.read("folder:existing", "../existing/editpack.json")
    with pytest.raises(KeyError):
        playground.read("folder:existing", "editpack.json")  # the manifest is not among the files it lists


def test_the_json_api(playground):
    client = TestClient(create_app(playground))
    page = client.get("/")
    assert page.status_code == 200 and 'id="compare"' in page.text
    listing = client.get("/api/packs").json()
    assert [p["key"] for p in listing["packs"]] == ["folder:existing"]
    assert client.post("/api/switch", json={"key": "folder:existing", "on": True}).json()["on"] is True
    compared = client.post("/api/compare", json={"prompt": "the famous eiffel tower", "max_new_tokens": 2}).json()
    assert compared["packs"] == ["existing@1.0.0"]
    assert client.post("/api/compare", json={"prompt": "  "}).status_code == 400
    assert client.post("/api/switch", json={"key": "folder:nope", "on": True}).status_code == 404
    assert client.get("/api/card", params={"key": "folder:existing"}).json()["html"].startswith("<")
    assert client.get("/api/file", params={"key": "folder:existing", "name": "editpack.json"}).status_code == 404
    job = client.post("/api/edit", json={"prompt": "the famous {}", "subject": "berlin", "target": "tokyo",
                                         "method": "no-such-method"})
    assert job.status_code == 400 and "no-such-method" in job.json()["error"]
    assert client.get("/api/jobs/999").status_code == 404


def test_hub_versions_are_listed_pulled_and_then_found_in_the_cache(playground, hub):
    from editpack.share.hub import push

    repo = "tester/existing"
    push(playground.packs_dir / "existing", repo)
    assert [v["version"] for v in playground.hub_versions(repo)] == ["1.0.0"]
    pulled = playground.pull(f"{repo}@1.0.0")
    assert pulled["key"] == f"hub:{repo}@1.0.0" and pulled["origin"] == "hub"
    # After a refresh the same pack is found in the Hugging Face cache (with its tag), not lost.
    keys = {p["key"]: p["origin"] for p in playground.refresh()}
    assert keys["cache:tester/existing@v1.0.0"] == "cache" and keys["folder:existing"] == "folder"
    playground.switch("cache:tester/existing@v1.0.0", True)
    assert playground.compare("the famous eiffel tower", max_new_tokens=2)["packs"] == ["existing@1.0.0"]
    with pytest.raises(editpack.EditpackError):
        playground.hub_versions("tester/no-such-repo")
