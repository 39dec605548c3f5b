"""The pack commands end to end on a tiny model saved as a local folder."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from editpack import EditPack, apply
from editpack.cli.main import main

from tiny import tiny_model, tiny_tokenizer

TINY_SETTINGS = ["--set", "mom2_adjustment=false", "--set", "context_template_lengths=[[3,2]]",
                 "--set", "clamp_norm_factor=10000", "--set", "v_weight_decay=0"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def model_dir(tiny_dir):
    return tiny_dir


@pytest.fixture
def pack_dir(model_dir, tmp_path):
    out = tmp_path / "pack"
    result = run("edit", "--model", model_dir, "--prompt", "the famous eiffel tower", "--subject", "eiffel tower",
                 "--target", "rome", "--target-true", "paris", "--layers", "1", *TINY_SETTINGS, "-o", out)
    assert result.exit_code == 0, result.output
    assert "wrote rome-eiffel-tower 1.0.0" in result.stdout and "after:  'rome" in result.stdout
    return out


def test_edit_show_generate_apply(model_dir, pack_dir, tmp_path):
    shown = run("show", pack_dir)
    assert shown.exit_code == 0 and "the famous eiffel tower -> rome  (was paris)" in shown.stdout
    assert "verified: yes" in shown.stdout and "model.layers.1.mlp.down_proj (rank 1)" in shown.stdout
    as_json = json.loads(run("show", "--json", pack_dir).stdout)
    assert as_json["verified"] and as_json["manifest"]["method"] == "rome"

    gen = run("generate", "--model", model_dir, "--pack", pack_dir, "--compare", "--max-new-tokens", "1",
              "the famous eiffel tower")
    assert gen.exit_code == 0 and "base:   'italy'" in gen.stdout and "edited: 'rome'" in gen.stdout

    out = tmp_path / "merged"
    merged = run("apply", "--model", model_dir, pack_dir, "-o", out)
    assert merged.exit_code == 0, merged.output
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    expected = apply(base, EditPack.load(pack_dir))
    ids = tiny_tokenizer()("the famous eiffel tower", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, expected(**ids).logits, rtol=1e-5, atol=1e-5)
    assert json.loads((out / "editpack_applied.json").read_text())["packs"][0]["name"] == "rome-eiffel-tower"


def test_apply_refuses_other_model_and_force_overrides(pack_dir, tmp_path):
    other = tmp_path / "other"
    tiny_model("llama", seed=5).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    refused = run("apply", "--model", other, pack_dir, "-o", tmp_path / "o")
    assert refused.exit_code == 1 and "it is a different model" in refused.output
    assert not (tmp_path / "o").exists()
    assert run("apply", "--model", other, "--force", pack_dir, "-o", tmp_path / "o").exit_code == 0


def test_edit_input_errors_write_nothing(model_dir, tmp_path):
    out = tmp_path / "never"
    bad = run("edit", "--model", model_dir, "--prompt", "the famous tower", "--subject", "eiffel tower",
              "--target", "rome", "-o", out)
    assert bad.exit_code == 1 and "does not occur in prompt" in bad.output
    both = run("edit", "--model", model_dir, "--facts", "x.json", "--prompt", "p", "-o", out)
    assert both.exit_code == 2 and "not both" in both.output
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": "{} is", "subject": "a", "target_new": "b", "oops": 1}) + "\n")
    unknown = run("edit", "--model", model_dir, "--facts", facts, "-o", out)
    assert unknown.exit_code == 1 and "facts.jsonl record 0: unknown field(s) oops" in unknown.output
    assert not out.exists()


def test_show_reports_tampering(pack_dir):
    (pack_dir / "README.md").write_text("changed")
    result = run("show", pack_dir)
    assert result.exit_code == 1 and "README.md does not match its sha256" in result.stdout


def make_pack(model_dir, out, prompt, subject, target, layer="1", name=None):
    args = ["edit", "--model", model_dir, "--prompt", prompt, "--subject", subject, "--target", target,
            "--layers", layer, *TINY_SETTINGS, "-o", out]
    result = run(*args, *(["--name", name] if name else []))
    assert result.exit_code == 0, result.output
    return out


def test_stack_generate_and_conflicts(model_dir, pack_dir, tmp_path):
    bridge = make_pack(model_dir, tmp_path / "bridge", "the old london bridge", "london bridge", "tokyo", "2")
    rival = make_pack(model_dir, tmp_path / "rival", "the famous eiffel tower", "eiffel tower", "berlin", "1", "rival")
    both = run("generate", "--model", model_dir, "--pack", pack_dir, "--pack", bridge, "--max-new-tokens", "1",
               "the famous eiffel tower", "the old london bridge")
    assert both.exit_code == 0 and both.stdout.split("\n")[:2] == ["the famous eiffel towerrome", "the old london bridgetokyo"]

    stacked = run("stack", pack_dir, bridge, "--model", model_dir, "-o", tmp_path / "s", "--version", "2.0.0")
    assert stacked.exit_code == 0 and "wrote stack-rome-eiffel-tower-and-1-more@2.0.0" in stacked.stdout
    shown = run("show", tmp_path / "s")
    assert "stacked from rome-eiffel-tower@1.0.0" in shown.stdout and "verified: yes" in shown.stdout
    one = run("generate", "--model", model_dir, "--pack", tmp_path / "s", "--max-new-tokens", "1",
              "the famous eiffel tower", "the old london bridge")
    assert one.stdout == both.stdout

    refused = run("stack", pack_dir, rival, "-o", tmp_path / "never")
    assert refused.exit_code == 1 and "conflicting packs" in refused.output and not (tmp_path / "never").exists()
    refused = run("apply", "--model", model_dir, pack_dir, rival, "-o", tmp_path / "never")
    assert refused.exit_code == 1 and "--later-wins" in refused.output and not (tmp_path / "never").exists()
    later = run("generate", "--model", model_dir, "--pack", pack_dir, "--pack", rival, "--later-wins",
                "--max-new-tokens", "1", "the famous eiffel tower")
    assert later.exit_code == 0 and later.stdout.startswith("the famous eiffel towerberlin")


def test_quantized_apply_is_refused_with_the_reason_and_max_memory_is_parsed(model_dir, pack_dir, tmp_path):
    refused = run("apply", "--model", model_dir, "--load-in-4bit", pack_dir, "-o", tmp_path / "q")
    assert refused.exit_code == 2 and "loses most of the edit" in refused.output
    bad = run("generate", "--model", model_dir, "--device-map", "auto", "--max-memory", "cpu", "x")
    assert bad.exit_code == 2 and "not DEVICE=SIZE" in bad.output
    offloaded = run("generate", "--model", model_dir, "--device-map", "auto", "--max-memory", "cpu=30000",
                    "--offload-folder", tmp_path / "off", "--pack", pack_dir, "--max-new-tokens", "1",
                    "the famous eiffel tower")
    assert offloaded.exit_code == 0 and offloaded.stdout.startswith("the famous eiffel towerrome"), offloaded.output


def test_edit_memit_then_onto_writes_the_next_version(model_dir, tmp_path):
    import json as _json

    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(_json.dumps(f) for f in [
        {"prompt": "the famous {}", "subject": "eiffel tower", "target_new": "rome"},
        {"prompt": "the old {}", "subject": "london bridge", "target_new": "tokyo"},
    ]) + "\n")
    more = tmp_path / "more.jsonl"
    more.write_text(_json.dumps({"prompt": "the red {}", "subject": "river", "target_new": "madrid"}) + "\n")
    settings = [*TINY_SETTINGS, "--set", "mom2_update_weight=0.1", "--set", "v_num_grad_steps=40"]
    first = run("edit", "--model", model_dir, "--method", "memit", "--facts", facts, "--layers", "1,2",
                "--name", "batch", *settings, "-o", tmp_path / "v1")
    assert first.exit_code == 0 and "wrote batch 1.0.0" in first.stdout, first.output
    assert "model.layers.1.mlp.down_proj" in first.stdout
    second = run("edit", "--model", model_dir, "--onto", tmp_path / "v1", "--facts", more, "-o", tmp_path / "v2")
    assert second.exit_code == 0 and "wrote batch 1.1.0" in second.stdout, second.output
    shown = run("show", tmp_path / "v2")
    assert "lineage: extends batch@1.0.0" in shown.stdout
    assert "facts:   3" in shown.stdout and "(rank 3)" in shown.stdout
    out = run("generate", "--model", model_dir, "--pack", tmp_path / "v2", "--max-new-tokens", "1",
              "the famous eiffel tower", "the old london bridge", "the red river")
    assert out.stdout.split("\n")[:3] == ["the famous eiffel towerrome", "the old london bridgetokyo",
                                          "the red rivermadrid"], out.stdout
