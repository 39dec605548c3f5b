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
