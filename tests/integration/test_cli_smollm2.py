"""The command on the real default model."""

from click.testing import CliRunner

from editpack.cli.main import main


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_generate_answers_paris(smollm2):
    result = run("generate", "--max-new-tokens", "4", "The capital of France is")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("The capital of France is Paris")
