import json

import pytest
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


@pytest.mark.slow
def test_generate_answers_paris(smollm2):
    result = run("generate", "--max-new-tokens", "4", "The capital of France is")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("The capital of France is Paris")
