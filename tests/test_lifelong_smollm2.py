"""Lifelong methods on the real SmolLM2-135M-Instruct (slow): a codebook and a side memory edited for real."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import editpack
from editpack.model.generation import generate

from conftest import EIFFEL, first_word

pytestmark = pytest.mark.slow

PROMPTS = {
    "The Eiffel Tower is located in the city of": "Rome",
    "The Louvre is located in the city of": "Paris",
    "The capital of Germany is": "Berlin",
}


def test_grace_moves_the_eiffel_tower_and_the_neighbours_stay(smollm2, tmp_path):
    model, tok = smollm2
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = generate(model, tok, list(PROMPTS), max_new_tokens=4)
    assert first_word(before[0]) == "Paris"
    pack = editpack.edit(model, EIFFEL, "grace", name="eiffel-grace")
    assert pack.kind == "codebook"
    edited = editpack.apply(model, pack)
    try:
        after = generate(edited, tok, list(PROMPTS), max_new_tokens=4)
    finally:
        model = editpack.revert(edited)
    assert [first_word(a) for a in after] == list(PROMPTS.values()), after
    assert after[1:] == before[1:]  # no key near: those generations are the base model's, token for token
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_a_thousand_entry_codebook_answers_as_its_ten_real_entries(smollm2, test_data):
    """Nearest-key lookups against 1,000 entries, 990 of them far away: the answers are those of the 10 alone."""
    model, tok = smollm2
    facts = editpack.load_facts(test_data / "counterfact-edit-25.json", limit=10)
    pack = editpack.edit(model, facts, "grace")
    torch.manual_seed(0)  # 990 far-away random entries beside the 10 real ones
    far = pack.keys.norm(dim=1).mean() * 10
    noise = torch.randn(990, pack.keys.shape[1])
    big = editpack.CodebookPack(
        name="big", version="1.0.0", method="grace", hyperparameters=pack.hyperparameters,
        facts=pack.facts + [editpack.make_fact("{} is in", f"Place {i}", "Rome") for i in range(990)],
        base=pack.base, module=pack.module, keys=torch.cat([pack.keys, noise / noise.norm(dim=1, keepdim=True) * far]),
        values=torch.cat([pack.values, pack.values[:1].repeat(990, 1)]), radii=torch.cat([pack.radii, pack.radii[:1].repeat(990)]))
    texts = [f.text for f in facts]
    small_answers = generate(editpack.apply(model, pack), tok, texts, max_new_tokens=3)
    model = editpack.revert(model)
    big_answers = generate(editpack.apply(model, big), tok, texts, max_new_tokens=3)
    model = editpack.revert(model)
    assert big_answers == small_answers


def test_lifelong_benchmark_runs_small(tmp_path, test_data):
    out, plot = tmp_path / "lifelong.json", tmp_path / "lifelong.png"
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "lifelong.py"), "--n", "6",
               "--round-size", "3", "--methods", "grace,wise", "--data", str(test_data / "counterfact-edit-25.json"),
               "--out", str(out), "--plot", str(plot), "--versions", str(tmp_path / "versions"),
               "--set", "wise:n_iter=5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(out.read_text())
    assert list(found["methods"]) == ["grace", "wise"]
    rounds = found["methods"]["grace"]["rounds"]
    assert [r["edits"] for r in rounds] == [3, 6] and [r["version"] for r in rounds] == ["1.0.0", "1.1.0"]
    assert rounds[-1]["scores"]["prob_compare"]["efficacy"]["after"] == 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entries = editpack.log(tmp_path / "versions" / "grace" / "grace-lifelong-1.1.0")
    assert [e.changes.counts for e in entries] == ["+3 ~0 -0", "+3 ~0 -0"]
    # The tables: each method after its last round beside the unedited model, then every round, per protocol.
    assert "| grace | 6 |" in result.stdout and "| wise | 6 |" in result.stdout
    unedited = found["methods"]["grace"]["rounds"][-1]["scores"]["prob_compare"]
    assert f"| unedited model | 6 | – | – | {100 * unedited['efficacy']['before']:.1f} / " in result.stdout
    rounds_rows = [line.split(" | ")[0] for line in result.stdout.splitlines() if line[2:4] in ("3 ", "6 ")]
    assert rounds_rows == ["| 3", "| 6", "| 3", "| 6"]  # one row per round, in each protocol's table
    table = tmp_path / "table.md"
    again = subprocess.run(command[:2] + ["--report", "--out", str(out), "--table", str(table)], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert table.read_text() == again.stdout and again.stdout in result.stdout

    # Cut short after grace's first round (its second version already saved, not yet recorded): --resume goes on
    # from the recorded version, makes the second again and leaves the finished method as it was.
    cut = json.loads(out.read_text())
    del cut["methods"]["grace"]["rounds"][1:], cut["methods"]["grace"]["seconds_per_edit"]
    out.write_text(json.dumps(cut))
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "grace: resuming after 3 edits (version 1.0.0)" in resumed.stdout
    again = json.loads(out.read_text())
    assert again["methods"]["wise"] == found["methods"]["wise"]
    assert [r["edits"] for r in again["methods"]["grace"]["rounds"]] == [3, 6]
    assert again["methods"]["grace"]["rounds"][1]["scores"] == rounds[1]["scores"]
    assert again["seconds_total"] > found["seconds_total"]
    assert len(again["commits"]) == 2 and again["commits"][0] == found["commits"][0]
    # Its versions gone (a fresh checkout keeps the JSON, not the ignored versions): the cut method starts again.
    out.write_text(json.dumps(cut))
    shutil.rmtree(tmp_path / "versions" / "grace")
    restarted = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=900)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "does not hold version 1.0.0; starting grace again" in restarted.stdout
    assert [r["scores"] for r in json.loads(out.read_text())["methods"]["grace"]["rounds"]] == [r["scores"] for r in rounds]
    other = subprocess.run(command[:command.index("--n") + 1] + ["5"] + command[command.index("--n") + 2:]
                           + ["--resume"], capture_output=True, text=True, timeout=900)
    assert other.returncode == 2 and "records another run" in other.stderr
    missing = command[:command.index("--out") + 1] + [str(tmp_path / "none.json")] + command[command.index("--out") + 2:]
    nothing = subprocess.run(missing + ["--resume"], capture_output=True, text=True, timeout=900)
    assert nothing.returncode == 2 and "none.json does not exist" in nothing.stderr
