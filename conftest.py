"""What every test suite of the repository shares (``tests/`` and ``bench/tests/``): tests that load a real model
are marked ``slow`` by the fixtures they use, never by hand."""

import pytest

#: Fixtures that load a real model (directly or by asking for one of these): a test using one is marked slow.
REAL_MODEL_FIXTURES = {"real_model", "smollm2", "eiffel"}


@pytest.fixture(scope="session")
def real_model() -> str:
    """The default built-in model's name, converted into the cache once; for tests that load it by name (a
    subprocess, a pipeline, a benchmark script). ``smollm2`` gives the loaded model itself."""
    from editpack.model.builtins import DEFAULT_MODEL, ensure_builtin

    ensure_builtin(DEFAULT_MODEL)
    return DEFAULT_MODEL


def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
