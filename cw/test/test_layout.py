"""
Tests of the layered layout's rules that C{lint-imports} does not check
(README "Architecture"): no import cycle between cw's modules, every module
opens with a docstring saying what it holds and what it may import, and
every import inside a function says why it is there; and the paths that
setup.cfg names (mutation testing) exist.
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import grimp
from twisted.trial.unittest import SynchronousTestCase

import cw
from cw.test.procs import ROOT

#: cw's own modules (not its tests), as paths.
SOURCES = sorted(p for p in Path(cw.__file__).parent.rglob("*.py") if "test" not in p.parts)


def import_cycles(graph, modules: list[str]) -> list[list[str]]:
    """The groups of C{modules} that import each other in a circle (Tarjan's algorithm)."""
    edges = {m: [d for d in graph.find_modules_directly_imported_by(m) if d in modules] for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in edges[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(group) > 1 or module in edges[module]:
                cycles.append(sorted(group))

    for module in modules:
        if module not in index:
            visit(module)
    return cycles


def _blank_or_import(line: str) -> bool:
    line = line.strip()
    return not line or line.startswith(("import ", "from "))


def unexplained_inner_imports(source: str) -> list[int]:
    """
    The lines of imports inside functions in C{source} with no comment on
    the line itself or in the comment block just above it.
    """
    lines = source.splitlines()
    bare = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            at = node.lineno - 1
            above = at - 1
            # Imports grouped under one comment (in one or more blocks) share it.
            while above >= 0 and _blank_or_import(lines[above]):
                above -= 1
            if "#" not in lines[at] and not (above >= 0 and lines[above].strip().startswith("#")):
                bare.append(node.lineno)
    return sorted(set(bare))


class LayoutTests(SynchronousTestCase):
    def test_no_import_cycle(self):
        # Imports under "if TYPE_CHECKING:" never run, so they make no cycle
        # (a type hint may name a class of a module that imports this one).
        graph = grimp.build_graph("cw", exclude_type_checking_imports=True)
        modules = sorted(m for m in graph.modules if not m.startswith("cw.test"))
        self.assertEqual(import_cycles(graph, modules), [])

    def test_cycle_found(self):
        """The check above can fail: a circle of two modules is found."""

        class Graph:
            imports = {"a": ["b"], "b": ["a", "c"], "c": []}

            def find_modules_directly_imported_by(self, module):
                return self.imports[module]

        self.assertEqual(import_cycles(Graph(), ["a", "b", "c"]), [["a", "b"]])

    def test_every_module_says_what_it_holds_and_imports(self):
        missing = []
        for path in SOURCES:
            doc = ast.get_docstring(ast.parse(path.read_text()))
            if not doc or "import" not in doc.lower():
                missing.append(str(path))
        self.assertEqual(missing, [])

    def test_imports_inside_functions_say_why(self):
        bare = {}
        for path in SOURCES:
            lines = unexplained_inner_imports(path.read_text())
            if lines:
                bare[str(path)] = lines
        self.assertEqual(bare, {})

    def test_bare_inner_import_found(self):
        source = "def f():\n    import os\n\n    # why\n    import sys\n    import re  # why\n"
        self.assertEqual(unexplained_inner_imports(source), [2])


class SetupCfgTests(SynchronousTestCase):
    def test_mutmut_paths_exist(self):
        """setup.cfg's [mutmut] names files (and test classes) that exist in this layout."""
        parser = configparser.ConfigParser()
        parser.read(Path(ROOT) / "setup.cfg")
        section = parser["mutmut"]
        named = section["only_mutate"].split() + section["pytest_add_cli_args_test_selection"].split()
        self.assertTrue(named)
        for entry in named:
            path, _, test_class = entry.partition("::")
            source = Path(ROOT) / path
            self.assertTrue(source.is_file(), f"setup.cfg [mutmut] names {path}, which does not exist")
            if test_class:
                self.assertIn(f"class {test_class}(", source.read_text(), entry)


class TestCommandTests(SynchronousTestCase):
    def test_ci_runs_the_readme_command(self):
        """.ci/run runs README.rst's test command verbatim (CI runs what the README says)."""
        readme = (Path(ROOT) / "README.rst").read_text()
        [command] = [
            line.strip()
            for line in readme.splitlines()
            if line.startswith("    python3 -m venv .venv && ") and "twisted.trial" in line
        ]
        ci = (Path(ROOT) / ".ci" / "run").read_text()
        self.assertIn(f"\n{command} 2>&1 | tee ", ci)
