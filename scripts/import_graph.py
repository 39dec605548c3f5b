"""The library's import graph: modules and their lines, import circles, function-local imports.

``python3 scripts/import_graph.py`` prints a summary (``--json`` the whole graph). Every import counts, at module
level, inside a function or under ``if TYPE_CHECKING:`` (a circle through type hints is still a circle); a package's ``__init__`` is a module of its
own, and importing ``a.b`` is not counted as importing ``a`` (Python runs ``a/__init__`` first, but that is the
package's business, not a dependency of the importer). ``cli/`` is read as ``editpack.cli``, as it installs.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"editpack": REPO / "editpack", "editpack.cli": REPO / "cli"}


def modules() -> dict[str, Path]:
    """``{dotted name: file}`` for every library module."""
    out = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """``(module imported, function-local?, line)`` for each library import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def resolve(base: str) -> str | None:
        while base and base not in known:
            base = base.rpartition(".")[0]
        return base or None

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = resolve(alias.name) if alias.name.startswith("editpack") else None
                    if target:
                        found.append((target, local, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{child.module}" if child.module else base
                else:
                    base = child.module or ""
                if not base.startswith("editpack"):
                    continue
                targets = {resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else resolve(base)
                           for alias in child.names}
                found.extend((t, local, child.lineno) for t in sorted(t for t in targets if t))
            visit(child, inner)

    visit(tree, False)
    return [(t, local, line) for t, local, line in found if t != name]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def look() -> dict:
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    local: list[dict] = []
    lines = {}
    for name, path in mods.items():
        lines[name] = len(path.read_text(encoding="utf-8").splitlines())
        graph[name] = set()
        for target, is_local, line in imports(name, path, known):
            graph[name].add(target)
            if is_local:
                local.append({"module": name, "imports": target, "line": line})
    library = {n: c for n, c in lines.items() if not n.startswith("editpack.cli")}
    largest = max(library, key=library.get)
    cli = {n: c for n, c in lines.items() if n.startswith("editpack.cli")}
    return {
        "modules": len(mods),
        "lines": sum(library.values()),
        "largest": {"module": largest, "lines": library[largest]},
        "over_450": sorted(n for n, c in library.items() if c > 450),
        "cli_lines": sum(cli.values()),
        "cli_largest": max(cli.values()) if cli else 0,
        "circles": circles(graph),
        "local_imports": local,
        "graph": {k: sorted(v) for k, v in sorted(graph.items())},
        "module_lines": lines,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="the whole graph as JSON")
    args = parser.parse_args()
    report = look()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"library: {report['modules']} modules, {report['lines']} lines (cli excluded); largest "
          f"{report['largest']['module']} ({report['largest']['lines']} lines); over 450: "
          f"{', '.join(report['over_450']) or 'none'}")
    print(f"cli: {report['cli_lines']} lines, largest module {report['cli_largest']}")
    print(f"circles: {len(report['circles'])}")
    for circle in report["circles"]:
        print("  " + " <-> ".join(circle))
    library = [i for i in report["local_imports"] if not i["module"].startswith("editpack.cli")]
    print(f"function-local imports in the library: {len(library)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
