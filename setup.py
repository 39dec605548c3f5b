"""Package discovery (everything else is in pyproject.toml).

The library's subpackages are found, not listed; three top-level folders of the layout install under
``editpack``: ``cli/`` as ``editpack.cli``, ``adapters/`` (architecture files) and ``cards/`` (card templates).
"""

from setuptools import find_packages, setup

MAPPED = {"editpack.cli": "cli", "editpack.adapters": "adapters", "editpack.cards": "cards"}

setup(packages=find_packages(include=["editpack", "editpack.*"]) + sorted(MAPPED), package_dir=MAPPED)
