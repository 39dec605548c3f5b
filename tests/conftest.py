import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for `tiny`

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"  # records and a corpus slice shipped with the tests (see its README)


@pytest.fixture(scope="session")
def test_data() -> Path:
    return DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (built-in default), loaded once per session in float32."""
    from editpack.models import load_model

    return load_model("smollm2-135m")


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
