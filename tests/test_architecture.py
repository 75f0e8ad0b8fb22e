"""The house rules, checked on the source with `ast` (nothing is imported or run).

(a) No import cycles between modules of xks_proxy and keymanager. Module-level and
    function-level imports both count: a lazy import still couples two modules. Imports under
    `if TYPE_CHECKING:` do not (they never run; they are how a backend names `Config` in a type).
(b) Nothing outside keymanager/<backend>/ imports keymanager.<backend>.*, except the registry
    (keymanager/registry.py): the server, CLI and admin API reach backends through
    keymanager/base.py's interfaces.
(c) No module over 400 lines unless its opening docstring says it is "one cohesive" thing, and why.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT
import pytest

PACKAGES = ("xks_proxy", "keymanager")
BACKENDS = ("vault", "pkcs11")
REGISTRY = "keymanager.registry"
MAX_LINES = 400

# What the restructure (issue 12) has not finished yet: each entry names the step that removes it.
# The lists may only shrink; a new cycle, backend import or long module fails the test.

#: Cycles the code still has. Empty is the goal.
KNOWN_CYCLES: dict[frozenset[str], str] = {}
#: Imports of backend internals from outside, besides the registry. Empty is the goal.
KNOWN_BACKEND_IMPORTS: dict[str, str] = {}
#: Modules over 400 lines whose split is still to do.
KNOWN_LONG: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that `name` imports at run time (a `from P import m` of a submodule counts as P.m)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{node.module}"
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    cycles = [c for c in _cycles(graph) if frozenset(c) not in KNOWN_CYCLES]
    assert cycles == [], f"import cycles: {cycles}"


def test_backends_are_reached_through_the_registry(graph: dict[str, set[str]]) -> None:
    offenders = []
    for name, targets in graph.items():
        for backend in BACKENDS:
            inside = f"keymanager.{backend}"
            if name == REGISTRY or name == inside or name.startswith(inside + "."):
                continue
            offenders += [f"{name} -> {t}" for t in targets if t == inside or t.startswith(inside + ".")]
    offenders = [o for o in offenders if o not in KNOWN_BACKEND_IMPORTS]
    assert offenders == [], "backend internals imported from outside their package:\n" + "\n".join(sorted(offenders))


def test_modules_are_small_or_say_why() -> None:
    too_long = []
    for name, path in _modules().items():
        text = path.read_text()
        lines = text.count("\n")
        if lines <= MAX_LINES or name in KNOWN_LONG:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "one cohesive" not in doc.lower():
            too_long.append(f"{name}: {lines} lines")
    assert too_long == [], "modules over 400 lines whose docstring does not say why:\n" + "\n".join(too_long)
