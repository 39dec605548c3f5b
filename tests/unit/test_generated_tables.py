"""The README's and the results pages' generated tables are what ``bench/results`` gives: a page edited by hand, or
a benchmark's JSON rerun without regenerating them, fails here (``python3 scripts/generated_tables.py`` fixes it)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_generated_tables_are_up_to_date():
    found = subprocess.run([sys.executable, str(REPO / "scripts" / "generated_tables.py"), "--check"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert found.returncode == 0, found.stdout + found.stderr
