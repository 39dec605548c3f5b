import json

from click.testing import CliRunner

from editpack import __version__
from editpack.cli.main import main


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_models_json_lists_builtins():
    result = run("models", "--json")
    assert result.exit_code == 0
    names = [row["name"] for row in json.loads(result.output)]
    assert names[0] == "smollm2-135m" and "gemma3-270m" in names


def test_unknown_model_is_a_clear_error():
    result = run("generate", "--model", "no-such-model", "hello")
    assert result.exit_code == 1
    assert "unknown model 'no-such-model'" in result.output
    assert "Traceback" not in result.output




def test_commands_print_only_editpacks_own_lines(tiny_dir, tmp_path):
    """edit, generate, apply and eval in fresh processes: no library warning reaches the terminal (--verbose shows
    them)."""
    import os

    from conftest import run_cli_quietly

    env = dict(os.environ, EDITPACK_HOME=str(tmp_path / "home"))
    settings = ["--set", "mom2_adjustment=false", "--set", "context_template_lengths=[[3,2]]", "--set",
                "clamp_norm_factor=10000", "--set", "v_weight_decay=0"]
    commands = [
        ["edit", "--model", str(tiny_dir), "--prompt", "the famous eiffel tower", "--subject", "eiffel tower",
         "--target", "rome", "--layers", "1", *settings, "-o", str(tmp_path / "p")],
        ["generate", "--model", str(tiny_dir), "--pack", str(tmp_path / "p"), "--compare", "--max-new-tokens", "2",
         "the famous eiffel tower"],
        ["apply", "--model", str(tiny_dir), str(tmp_path / "p"), "-o", str(tmp_path / "merged")],
        ["eval", str(tmp_path / "p"), "--model", str(tiny_dir), "--protocol", "prob_compare"],
    ]
    run_cli_quietly(commands, env)
