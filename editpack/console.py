"""What the ``editpack`` command prints: its own lines only, unless ``--verbose``.

The libraries under editpack (transformers, PEFT, accelerate, bitsandbytes, huggingface_hub, torch) report
through Python warnings and ``logging``. The command sets them to errors only and hides their warnings, so a
normal run prints editpack's lines and progress bars; ``--verbose`` leaves both as the libraries set them.
editpack's own warnings (a pack left out by ``--later-wins``, an edit that did not reach its target) are shown
as ``Warning: …`` lines either way. Library code never calls this: a program that imports editpack keeps its
own warning and logging settings.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from ._lazy import hf_logging

LIBRARIES = ("transformers", "peft", "accelerate", "bitsandbytes", "huggingface_hub", "torch", "safetensors",
             "tokenizers", "filelock", "urllib3", "httpx", "gguf", "kernels")


def configure(verbose: bool = False) -> None:
    """Set up warnings and logging for one command run (see the module docstring)."""
    global _VERBOSE
    _VERBOSE = verbose
    warnings.showwarning = _show
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN_WARNING", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"editpack(\.|$)")
    if "transformers" in sys.modules:  # already imported: its own verbosity setting, not only the logger's
        hf_logging.set_verbosity_error()


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    # Without --verbose only editpack's own warnings get here (the filters above): print them as its lines.
    if _VERBOSE:
        print(f"{filename}:{lineno}: {category.__name__}: {message}", file=sys.stderr)
    else:
        print(f"Warning: {message}", file=sys.stderr)


_VERBOSE = False
