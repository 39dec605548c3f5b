import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # the helpers beside this file: tiny, traces, casebook, docs_examples

REPO = TESTS.parent
DATA = Path(__file__).resolve().parent / "data"  # records and a corpus slice shipped with the tests (see its README)


@pytest.fixture(scope="session")
def test_data() -> Path:
    return DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (built-in default), loaded once per session in float32."""
    from editpack.model.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(autouse=True)
def editpack_logger_restored():
    """The CLI sets up the ``editpack`` logger for a process (its own handler, no propagation); run in-process by
    CliRunner, that would outlive the test and hide later tests' log records from ``caplog``."""
    import logging

    log = logging.getLogger("editpack")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers, log.level, log.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """A private EDITPACK_HOME, so a test's caches neither see nor touch the user's."""
    monkeypatch.setenv("EDITPACK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


EIFFEL = {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower",
          "target_new": "Rome", "target_true": "Paris"}


def first_word(text: str) -> str:
    return text.strip().split()[0].strip(".,") if text.strip() else ""


@pytest.fixture(scope="session")
def corpus():
    """A 110k-token Wikipedia slice shipped in tests/data (ROME's statistics use 100k tokens)."""
    return str(DATA / "wikipedia-slice.jsonl")


@pytest.fixture(scope="session")
def eiffel(smollm2, corpus, tmp_path_factory):
    """The Eiffel Tower -> Rome ROME pack on SmolLM2 (statistics from the shipped Wikipedia slice), saved once per session."""
    import editpack

    model, _ = smollm2
    pack = editpack.edit(model, EIFFEL, stats_corpus=corpus)
    path = tmp_path_factory.mktemp("packs") / "eiffel-rome"
    pack.save(path)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh Hub-compatible server, this process pointed at it, and a private Hugging Face cache without a login."""
    import huggingface_hub.constants as hf_constants

    from editpack.testing.hub import HubServer

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", server.token)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        yield server


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny random Llama-like model and its word-level tokenizer saved as a local folder."""
    from tiny import tiny_model, tiny_tokenizer

    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


LIBRARY_NOISE = ("Warning", "warn", "deprecated", "kernels-community", "Writing model shards", "Loading weights")


def run_cli_quietly(commands, env) -> list[str]:
    """Run each ``editpack`` command line in a fresh process; each must succeed and print no library noise (the
    warnings and log lines of torch, transformers, PEFT, …). Returns their standard outputs."""
    import subprocess
    import sys

    outputs = []
    for args in commands:
        result = subprocess.run([sys.executable, "-m", "editpack.cli.main", *args], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        lines = [line for line in (result.stdout + result.stderr).splitlines()
                 if any(n in line for n in LIBRARY_NOISE)]
        assert not lines, f"editpack {args[0]} printed library noise: {lines}"
        outputs.append(result.stdout)
    return outputs


def pytest_terminal_summary(terminalreporter):
    """The bad-input cases' table (``tests/casebook.py``), when a run recorded any."""
    import casebook

    if casebook.ROWS:
        terminalreporter.write_sep("=", f"bad input: {len(casebook.ROWS)} cases and what each gets now")
        terminalreporter.write_line(casebook.table())
        casebook.write_table()
