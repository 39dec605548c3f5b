"""The modules editpack imports only when they are first used, in one place; every other import is at module level.

Two kinds live here:

- optional dependencies, each with what installs it: the playground's web stack (``editpack[ui]``) and
  bitsandbytes (``editpack[quant]``); a missing one is a :class:`~editpack.errors.MissingPackageError` naming the
  command, raised where the feature is used;
- required dependencies that take seconds to import and that most commands never need: PEFT (which imports
  bitsandbytes and its kernel checks), transformers' model classes, accelerate, matplotlib, the GGUF reader.

Each name below is a module object that imports the real module the first time one of its attributes is read
(``peft.PeftModel``); importing it from here costs nothing.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from .errors import MissingPackageError


class Deferred(types.ModuleType):
    """A module imported on first attribute access; ``install`` says how to get it when it is optional."""

    def __init__(self, name: str, install: str | None = None) -> None:
        super().__init__(name)
        self.__dict__["_install"] = install
        self.__dict__["_module"] = None

    def load(self) -> types.ModuleType:
        module = self.__dict__["_module"]
        if module is None:
            try:
                module = importlib.import_module(self.__name__)
            except ImportError as exc:
                if self.__dict__["_install"] is None:
                    raise
                raise MissingPackageError(f"this needs {self.__name__.split('.')[0]}: "
                                          f"{self.__dict__['_install']}") from exc
            self.__dict__["_module"] = module
        return module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.load(), name)

    def __repr__(self) -> str:
        return f"<deferred module {self.__name__!r}>"


UI = "pip install 'editpack[ui]'"

# Optional.
fastapi = Deferred("fastapi", UI)
fastapi_responses = Deferred("fastapi.responses", UI)
trustedhost = Deferred("starlette.middleware.trustedhost", UI)
markdown_it = Deferred("markdown_it", UI)
uvicorn = Deferred("uvicorn", UI)

# Required, imported when used.
peft = Deferred("peft")
transformers = Deferred("transformers")
hf_logging = Deferred("transformers.utils.logging")
gguf_utils = Deferred("transformers.modeling_gguf_pytorch_utils")
accelerate_utils = Deferred("accelerate.utils")
matplotlib = Deferred("matplotlib")
matplotlib_figure = Deferred("matplotlib.figure")
gguf = Deferred("gguf")
jinja2 = Deferred("jinja2")
tokenizers = Deferred("tokenizers")
