"""
The package's layers, read from its import statements: the core imports no
wing, the devcloud shares only the protocol pieces with the daemon, and no
product module imports the devcloud or the tests.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import ngrokd

_ROOT = os.path.dirname(ngrokd.__file__)

#: Values and pure decisions, and the small utilities every part uses.
CORE = {
    "ngrokd",
    "ngrokd.atomic",
    "ngrokd.blocking",
    "ngrokd.board",
    "ngrokd.config",
    "ngrokd.config.addresses",
    "ngrokd.config.context",
    "ngrokd.config.derived",
    "ngrokd.config.loader",
    "ngrokd.config.schema",
    "ngrokd.config.values",
    "ngrokd.endpoints",
    "ngrokd.events",
    "ngrokd.instance",
    "ngrokd.logs",
    "ngrokd.names",
    "ngrokd.pem",
    "ngrokd.plan",
    "ngrokd.problems",
    "ngrokd.readfile",
    "ngrokd.reconfigure",
    "ngrokd.retry",
    "ngrokd.servicetree",
    "ngrokd.status",
    "ngrokd.summarylog",
}
#: What the devcloud shares with the daemon: how ngrok's side speaks, and
#: how a pipe's far leg is dialled.
PROTOCOL = {
    "ngrokd.datapath.wire",
    "ngrokd.datapath.conn_header_pb2",
    "ngrokd.datapath.splice",
    "ngrokd.datapath.halfclose",
    "ngrokd.datapath.dial",
}
#: Wings that may import the core alone (and themselves).
SELF_CONTAINED = ("ngrokd.dns",)
#: The programs that run the devcloud beside the daemon.
DEVCLOUD_USERS = {"ngrokd.demo"}


def _modules() -> dict[str, set[str]]:
    """
    Every module of the package but the tests, with the C{ngrokd} modules
    it imports.
    """
    found: dict[str, set[str]] = {}
    for folder, dirs, files in os.walk(_ROOT):
        dirs[:] = [d for d in dirs if d not in {"test", "__pycache__"}]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, os.path.dirname(_ROOT))[:-3]
            module = relative.replace(os.sep, ".").removesuffix(".__init__")
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            found[module] = _imports(tree)
    return found


def _imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "ngrokd" or n.startswith("ngrokd.")}


def _modules_only(names: set[str], modules: dict[str, set[str]]) -> set[str]:
    """
    The modules among C{names}: not attributes ("from ngrokd import
    __version__"), and not a package named only to import its modules
    ("from ngrokd.datapath import wire").
    """
    return {
        n
        for n in names
        if n in modules
        and (n == "ngrokd" or not any(m.startswith(n + ".") for m in modules))
    }


class LayerTests(SynchronousTestCase):
    """
    Arrows between the package's parts run one way.
    """

    def setUp(self) -> None:
        self.modules = _modules()

    def test_found(self) -> None:
        """
        The walk sees the package (a broken walk must not pass every rule).
        """
        self.assertTrue(
            {"ngrokd.daemon", "ngrokd.plan", "ngrokd.devcloud.ingress"}
            <= set(self.modules)
        )

    def test_coreImportsNoWing(self) -> None:
        """
        The core imports only the core.
        """
        wrong = {
            module: sorted(_modules_only(names, self.modules) - CORE)
            for module, names in self.modules.items()
            if module in CORE and _modules_only(names, self.modules) - CORE
        }
        self.assertEqual(wrong, {})

    def test_devcloudSharesOnlyTheProtocol(self) -> None:
        """
        The devcloud imports itself, the core and the protocol pieces, never
        the daemon's listeners, identity or host code.
        """
        allowed = CORE | PROTOCOL
        wrong = {}
        for module, names in self.modules.items():
            if not module.startswith("ngrokd.devcloud"):
                continue
            bad = {
                n
                for n in _modules_only(names, self.modules)
                if n not in allowed and not n.startswith("ngrokd.devcloud")
            }
            if bad:
                wrong[module] = sorted(bad)
        self.assertEqual(wrong, {})

    def test_daemonDoesNotNeedTheDevcloud(self) -> None:
        """
        Only the demo imports the devcloud; the daemon runs without it.
        """
        users = {
            module
            for module, names in self.modules.items()
            if not module.startswith("ngrokd.devcloud")
            and any(n.startswith("ngrokd.devcloud") for n in names)
        }
        self.assertEqual(users - DEVCLOUD_USERS, set())

    def test_selfContainedWings(self) -> None:
        """
        The DNS server imports itself and the core, nothing of the daemon.
        """
        wrong = {}
        for module, names in self.modules.items():
            wing = next((w for w in SELF_CONTAINED if module.startswith(w)), None)
            if wing is None:
                continue
            bad = {
                n
                for n in _modules_only(names, self.modules)
                if n not in CORE and not n.startswith(wing)
            }
            if bad:
                wrong[module] = sorted(bad)
        self.assertEqual(wrong, {})
        self.assertIn("ngrokd.dns.server", self.modules)
