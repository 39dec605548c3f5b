"""``editpack ui``: a local web page to browse packs, switch them on and off, compare continuations and edit.

The state and every action live in :class:`editpack.ui.playground.Playground` (plain Python, tested without a
browser); :mod:`editpack.ui.app` is a thin FastAPI layer over it plus one static page. Install with
``pip install 'editpack[ui]'``.
"""

from .playground import Playground

__all__ = ["Playground"]
