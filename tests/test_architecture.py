"""
The shape of the package, pinned (docs/design.md, "Shape"): no import
cycles between the relay's modules (imports inside functions count: a lazy
import is a cycle postponed, not removed), no product module over 700
lines and no class over 300, and interfaces only in C{interfaces.py}; and
in the tests, no test module importing from another test module: shared
helpers live in C{tests/common/}.

These read the source with C{ast}; nothing is imported or run.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Iterator

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = "poststack_relay"
ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / PACKAGE
TESTS_DIR = ROOT / "tests"
#: The one package the tests share helpers through.
SHARED_HELPERS = "tests.common"

#: The bounds the issue set: a newcomer changing one job reads one module.
MAX_MODULE_LINES = 700
MAX_CLASS_LINES = 300


def module_files() -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every module of the package."""
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name an C{ImportFrom} node imports from."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """
    The package's own modules that C{module} imports, anywhere in its body
    (top level, functions, C{TYPE_CHECKING} blocks excepted: those are
    never executed).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    skipped.add(id(sub))
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node)
            names = [source] + [f"{source}.{alias.name}" for alias in node.names]
        for name in names:
            # The longest known module that the name is or lies within.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith(PACKAGE):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = dict(module_files())
    known = set(files)
    graph = {module: imports_of(module, path, known) for module, path in files.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of
    # the design: an edge from a package to one of its own submodules is
    # dropped (the submodule importing a sibling through the package would
    # still show up as submodule -> package -> sibling).
    for module, edges in graph.items():
        graph[module] = {e for e in edges if not e.startswith(module + ".")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


class CycleFinderTests(SynchronousTestCase):
    """The cycle finder itself finds cycles (so its silence means something)."""

    def test_finds_a_cycle(self) -> None:
        """A two-module cycle and a three-module cycle are both reported."""
        graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
        self.assertEqual(sorted(find_cycles(graph)), [["a", "b"], ["c", "d", "e"]])

    def test_lazy_import_counts(self) -> None:
        """An import inside a function is an edge of the graph."""
        module = ast.parse("def f():\n    from .b import x\n")
        path = ROOT / "tests" / "_lazy_probe.py"
        path.write_text(ast.unparse(module), encoding="utf-8")
        self.addCleanup(os.remove, path)
        edges = imports_of(f"{PACKAGE}.a", path, {f"{PACKAGE}.a", f"{PACKAGE}.b"})
        self.assertEqual(edges, {f"{PACKAGE}.b"})


def imports_of_test_modules(path: Path) -> set[str]:
    """
    The modules of C{tests} that the file at C{path} (a module of C{tests})
    imports from, anywhere in its body, other than the shared helpers of
    C{tests.common}.
    """
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    module = ".".join(parts)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node)
            # "from tests.e2e import test_x" imports the module tests.e2e.test_x.
            is_dir = (ROOT / source.replace(".", os.sep)).is_dir()
            names = [f"{source}.{alias.name}" for alias in node.names] if is_dir else [source]
        else:
            continue
        for name in names:
            if name.split(".")[0] != "tests":
                continue
            if name == SHARED_HELPERS or name.startswith(SHARED_HELPERS + "."):
                continue
            found.add(name)
    return found


class HelperImportCheckTests(SynchronousTestCase):
    """The helper-import check itself sees imports of test modules (so its silence means something)."""

    def probe(self, source: str, name: str = "_import_probe.py") -> set[str]:
        path = TESTS_DIR / "e2e" / name
        path.write_text(source, encoding="utf-8")
        self.addCleanup(os.remove, path)
        return imports_of_test_modules(path)

    def test_finds_imports_of_test_modules(self) -> None:
        """Absolute, relative, package-level and lazy imports of a test module are all found."""
        source = (
            "from tests.test_api import email\n"
            "import tests.e2e.test_e2e_smtp\n"
            "from tests import test_tls_scan\n"
            "from . import test_e2e_faults\n"
            "from ..interop.test_postfix import x\n"
            "def f():\n"
            "    from tests.smtp_harness import Harness\n"
        )
        self.assertEqual(
            self.probe(source),
            {
                "tests.test_api",
                "tests.e2e.test_e2e_smtp",
                "tests.test_tls_scan",
                "tests.e2e.test_e2e_faults",
                "tests.interop.test_postfix",
                "tests.smtp_harness",
            },
        )

    def test_shared_helpers_allowed(self) -> None:
        """Imports from tests.common, the product and the standard library are not reported."""
        source = (
            "import os\n"
            "from poststack_relay.testing import MemoryEmailAPI\n"
            "from tests.common.processes import free_port\n"
            "from ..common import keys\n"
            "import tests.common.relay\n"
        )
        self.assertEqual(self.probe(source), set())


class TestLayoutTests(SynchronousTestCase):
    """The tests keep the layout their package docstring describes."""

    maxDiff = None

    def test_helpers_only_from_tests_common(self) -> None:
        """No module of tests/ imports from a test module: only from tests.common (and the product)."""
        found = {}
        for path in sorted(TESTS_DIR.rglob("*.py")):
            if path.name.startswith("_") and path.name != "__init__.py":
                continue
            imported = imports_of_test_modules(path)
            if imported:
                found[str(path.relative_to(ROOT))] = sorted(imported)
        self.assertEqual(found, {})


    def test_named_tests_exist(self) -> None:
        """Every module a C{test-case-name} line names (product and helpers) exists."""
        missing = {}
        for path in sorted([*PACKAGE_DIR.rglob("*.py"), *(TESTS_DIR / "common").rglob("*.py")]):
            first = path.read_text(encoding="utf-8").split("\n", 1)[0]
            if "test-case-name:" not in first:
                continue
            names = first.split("test-case-name:", 1)[1].replace("-*-", "").strip().split(",")
            gone = [n for n in names if not (ROOT / (n.strip().replace(".", os.sep) + ".py")).is_file()]
            if gone:
                missing[str(path.relative_to(ROOT))] = gone
        self.assertEqual(missing, {})


class ShapeTests(SynchronousTestCase):
    """The package keeps the shape docs/design.md describes."""

    def test_no_import_cycles(self) -> None:
        """No module of the relay imports, even lazily, a module that imports it back."""
        self.assertEqual(find_cycles(import_graph()), [])

    def test_module_size(self) -> None:
        """No product module is over 700 lines."""
        long = {
            module: n
            for module, path in module_files()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
        }
        self.assertEqual(long, {})

    def test_class_size(self) -> None:
        """No class is over 300 lines."""
        large = {}
        for module, path in module_files():
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > MAX_CLASS_LINES:
                        large[f"{module}.{node.name}"] = lines
        self.assertEqual(large, {})

    def test_interfaces_in_one_module(self) -> None:
        """Every zope Interface of the relay is defined in poststack_relay.interfaces."""
        elsewhere = []
        for module, path in module_files():
            if module == f"{PACKAGE}.interfaces":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef) and any(
                    ast.unparse(base) in ("Interface", "zope.interface.Interface") for base in node.bases
                ):
                    elsewhere.append(f"{module}.{node.name}")
        self.assertEqual(elsewhere, [])


class TypeIgnoreTests(SynchronousTestCase):
    """mypy --strict runs in make test; what it is told to ignore is explained."""

    def test_every_ignore_says_why(self) -> None:
        """
        Every C{type: ignore} names its error code (mypy enforces that) and
        has a reason: a comment after it on the line, or a comment line
        right above.
        """
        unexplained = []
        for module, path in module_files():
            lines = path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines):
                at = line.find("# type: ignore[")
                if at < 0:
                    continue
                after = line[at:].split("]", 1)[1] if "]" in line[at:] else ""
                above = lines[number - 1].strip() if number else ""
                if "#" not in after and not above.startswith("#"):
                    unexplained.append(f"{path.relative_to(ROOT)}:{number + 1}")
        self.assertEqual(unexplained, [])
