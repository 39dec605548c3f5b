"""The documentation's examples marked ``<!-- runnable: real -->`` run on the real default model, as a reader would
run them (``tests/docs_examples.py``)."""

import pytest

from docs_examples import REPO, environment, examples, run_page

PAGES = examples(real=True)


@pytest.mark.parametrize("page", sorted(PAGES), ids=lambda p: str(p.relative_to(REPO)))
def test_a_pages_real_examples_run(page, tmp_path, real_model):
    env = environment(None)
    env["HF_HOME"] = str(tmp_path / "hf")
    run_page(PAGES[page], tmp_path / "work", env)
