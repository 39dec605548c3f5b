import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for `tiny`

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EDITPACK_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


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
def corpus(shared_data):
    return str(shared_data / "corpus" / "wikipedia_en_sample.jsonl")


@pytest.fixture(scope="session")
def eiffel(smollm2, corpus, tmp_path_factory):
    """The Eiffel Tower -> Rome ROME pack on SmolLM2 (shared Wikipedia statistics), saved once per session."""
    import editpack

    model, _ = smollm2
    pack = editpack.edit(model, EIFFEL, stats_corpus=corpus)
    path = tmp_path_factory.mktemp("packs") / "eiffel-rome"
    pack.save(path)
    return path
