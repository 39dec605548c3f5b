"""``editpack`` command-line entry point: the group, its global options, and the commands of each module.

Every command is click glue over a library function; what is checked, merged or decided lives in the library
(``editpack.api``, the registries), so the Python API and the command agree.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys

import click

from editpack import __version__, console

from . import edit, evaluate, hub, models, packs, stats, ui
from .common import terminate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="editpack")
@click.option("--verbose", "-v", is_flag=True, default=False, help="Show the libraries' warnings and log messages too.")
def main(verbose: bool) -> None:
    """Knowledge edits of language models as versioned, shareable packs."""
    console.configure(verbose)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("editpack")
    log.handlers = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    with contextlib.suppress(ValueError):  # only the main thread may set handlers (not under some test runners)
        signal.signal(signal.SIGTERM, terminate)


for group in (models, edit, packs, hub, evaluate, stats, ui):
    for command in group.COMMANDS:
        main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
