"""The documentation's runnable examples (``tests/docs_examples.py``) run, page by page, on a tiny random model
standing in for the default built-in; the ones marked ``real`` run in ``tests/integration``. The site builds
offline with ``mkdocs build --strict`` when MkDocs is installed (the ``docs`` extra)."""

import importlib.util
import subprocess
import sys

import pytest

from docs_examples import REPO, environment, examples, run_page, stand_in_home
from editpack.testing.hub import HubServer

PAGES = examples(real=False)


def test_runnable_examples_are_found_on_the_readme_and_the_guides():
    everything = {**PAGES, **examples(real=True)}
    assert REPO / "README.md" in everything and sum(map(len, everything.values())) >= 10
    assert any("guides" in p.parts for p in everything)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One stand-in home for every page: the key statistics the tiny model needs are computed once."""
    folder = tmp_path_factory.mktemp("stand-in-home")
    stand_in_home(folder)
    return folder


@pytest.mark.parametrize("page", sorted(PAGES), ids=lambda p: str(p.relative_to(REPO)))
def test_a_pages_runnable_examples_run(page, home, tmp_path):
    with HubServer() as hub:
        env = environment(home, hub)
        env["HF_HOME"] = str(tmp_path / "hf")
        run_page(PAGES[page], tmp_path / "work", env)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="needs the docs extra (pip install '.[docs]')")
def test_the_documentation_site_builds_offline_and_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pages = sorted(p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html"))
    from editpack.cli.main import main

    assert all(f"reference/cli/{name}/index.html" in pages for name in main.commands)  # every command has a page
    html = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "site").rglob("*.html"))
    assert "fonts.googleapis" not in html and "fonts.gstatic" not in html  # nothing fetched from the network
