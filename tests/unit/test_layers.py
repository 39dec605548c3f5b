"""The import graph is a clean stack of layers: no module imports (at module level) one that imports it back."""

import ast
from pathlib import Path

import editpack

PACKAGE = Path(editpack.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """editpack modules imported when ``path`` is imported (function bodies and TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.startswith("editpack"):
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in child.names)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("editpack"))
    return found


def test_no_import_cycles_between_library_modules(package=PACKAGE):
    modules = {module_name(p): p for p in package.rglob("*.py")}
    def with_parents(names: set[str]) -> set[str]:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        return names | {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}

    graph = {name: {m for m in with_parents(top_level_imports(path)) if m in modules and m != name}
             for name, path in modules.items()}
    # A package's __init__ importing its own submodules (registration) is not a cycle of layers.
    graph = {name: {m for m in deps if not (name.startswith(m + ".") and modules[m].name == "__init__.py")}
             for name, deps in graph.items()}
    graph.pop("editpack", None)  # the public facade imports everything on purpose
    for deps in graph.values():
        deps.discard("editpack")
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_kinds_register_themselves():
    from editpack.packs.artifact import KINDS

    assert sorted(KINDS) == ["codebook", "editor", "memory", "side_memory", "statistics", "weight"]
    assert not KINDS["editor"].holds_weights and not KINDS["editor"].mergeable and not KINDS["editor"].hooks_modules
    assert KINDS["weight"].holds_weights and not KINDS["memory"].holds_weights
    assert KINDS["codebook"].hooks_modules and KINDS["side_memory"].hooks_modules
    assert not KINDS["codebook"].holds_weights and not KINDS["side_memory"].mergeable
    assert not (KINDS["statistics"].holds_weights or KINDS["statistics"].mergeable or KINDS["statistics"].hooks_modules)
