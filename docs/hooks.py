"""MkDocs hooks: one generated page per ``editpack`` command (mkdocs-click over the click group itself), so the
command-line reference lists every command and cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

from editpack.cli.main import main

REPO = Path(__file__).resolve().parents[1]

PREFIX = "reference/cli"


def _page(name: str, command) -> str:
    module, function = command.callback.__module__, command.callback.__name__
    return (f"::: mkdocs-click\n    :module: {module}\n    :command: {function}\n"
            f"    :prog_name: editpack {name}\n    :style: table\n")


def on_config(config):
    names = sorted(main.commands)
    for section in config["nav"]:
        reference = section.get("Reference") if isinstance(section, dict) else None
        if reference is not None:
            for entry in reference:
                if isinstance(entry, dict) and "Command line" in entry:
                    entry["Command line"] = [f"{PREFIX}/index.md", *[{f"editpack {n}": f"{PREFIX}/{n}.md"}
                                                                    for n in names]]
    return config


def on_files(files, config):
    names = sorted(main.commands)
    rows = "\n".join(f"| [`editpack {n}`]({n}.md) | {main.commands[n].get_short_help_str(100)} |" for n in names)
    index = ("# Command line\n\nEvery command, generated from the click commands themselves "
             "(`editpack COMMAND --help` prints the same).\n\n"
             "| command | what it does |\n|---|---|\n" + rows + "\n\n"
             "Global options: `editpack --verbose` (the libraries' warnings and logs too), `--version`.\n")
    files.append(File.generated(config, f"{PREFIX}/index.md", content=index))
    files.append(File.generated(config, "index.md", content=home()))
    for name in names:
        files.append(File.generated(config, f"{PREFIX}/{name}.md", content=_page(name, main.commands[name])))
    return files


def home() -> str:
    """The site's home page is the README: its links into ``docs/`` become site links, links to other files of
    the repository plain text."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    text = text.replace("](docs/", "](")
    return re.sub(r"\[([^\]]+)\]\((?!https?://|#)([^)]+\.(?:toml|json|sh|py|txt))\)", r"\1 (`\2`)", text)
