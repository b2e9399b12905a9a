"""
Tests for the C{test-case-name} header every module of ngrokd starts with:
C{trial --testmodule} runs what it names, so it must name test modules that
exist and test the module.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil

from twisted.scripts.trial import getTestModules
from twisted.trial.unittest import SynchronousTestCase

import ngrokd


def _modules() -> dict[str, str]:
    """
    Every module of the installed package but the tests and generated code,
    by name, with its file.
    """
    found = {}
    for info in pkgutil.walk_packages(ngrokd.__path__, "ngrokd."):
        if info.name.startswith("ngrokd.test") or info.name.endswith("_pb2"):
            continue
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin is not None
        found[info.name] = spec.origin
    return found


def _origin(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _imports(path: str) -> set[str]:
    """
    The modules C{path} imports, and the names it imports from them.
    """
    with open(path) as f:
        tree = ast.parse(f.read())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


class HeaderTests(SynchronousTestCase):
    """
    Each module's header, read as trial reads it.
    """

    def test_everyModuleHasOne(self) -> None:
        """
        Every module but a package's C{__init__} starts with a header.
        """
        missing = [
            name
            for name, path in _modules().items()
            if not path.endswith("__init__.py") and not getTestModules(path)
        ]
        self.assertEqual(missing, [], "no test-case-name header")

    def test_namedTestsExist(self) -> None:
        """
        Every test module a header names exists.
        """
        missing = [
            f"{name} names {test}"
            for name, path in _modules().items()
            for test in getTestModules(path)
            if _origin(test) is None
        ]
        self.assertEqual(missing, [], "test modules that do not exist")

    def test_namedTestsImportTheModule(self) -> None:
        """
        At least one of the test modules a header names imports the module,
        so the header does not point at tests of something else.
        """
        unrelated = []
        for name, path in _modules().items():
            tests = [_origin(test) for test in getTestModules(path)]
            found = [t for t in tests if t is not None]
            if found and not any(name in _imports(t) for t in found):
                unrelated.append(name)
        self.assertEqual(unrelated, [], "no named test module imports these")
