"""The house stays in order: no circle of imports, editpack's own modules imported at module level only, no
library module over 450 lines, and every wing imports only the wings below it."""

import importlib.util

from conftest import REPO

spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(graph)
LOOK = graph.look()

#: The wings from the bottom up: a module may import its own wing and those before it.
WINGS = ["foundation", "model", "packs", "share", "runtime", "evaluation", "methods", "export", "api", "ui",
         "cli"]
FOUNDATION = {"_version", "_lazy", "errors", "_io", "paths", "console", "facts", "chat", "suites", "relations"}


def wing(module: str) -> str:
    part = module.split(".")[1] if module.count(".") else "api"
    if module == "editpack":
        return "cli"  # the package's __init__ re-exports the public API from every wing
    if part in FOUNDATION:
        return "foundation"
    return {"testing": "ui", "api": "api"}.get(part, part)


def test_no_circles_and_no_function_local_imports_of_editpack():
    assert LOOK["circles"] == []
    local = [i for i in LOOK["local_imports"] if not i["module"].startswith("editpack.cli")]
    assert local == []


def test_no_library_module_over_450_lines():
    assert LOOK["over_450"] == [], LOOK["largest"]


def test_each_wing_imports_only_itself_and_the_wings_below():
    upward = [(module, target) for module, targets in LOOK["graph"].items() for target in targets
              if WINGS.index(wing(target)) > WINGS.index(wing(module))]
    assert upward == []
