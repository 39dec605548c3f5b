"""Checks that a folder holds no trace of the machine that wrote it (home, user, host, local paths)."""

from pathlib import Path


def local_traces() -> list[str]:
    """Strings that would betray the machine a pack was made on."""
    import getpass
    import socket

    return [str(Path.home()), getpass.getuser(), socket.gethostname()]


def assert_no_local_traces(folder: Path, *extra: str) -> None:
    import re

    for path in folder.iterdir():
        data = path.read_bytes()
        text = data.decode("utf-8", errors="replace")
        for trace in [*local_traces(), *extra]:
            if len(trace) >= 8:  # long strings: anywhere in the bytes
                assert trace.encode() not in data, f"{path.name} holds {trace!r}"
            elif path.suffix in (".json", ".md"):  # short ones (a user name): as a word in the text files
                assert not re.search(rf"(?<![\w]){re.escape(trace)}(?![\w])", text), f"{path.name} holds {trace!r}"
