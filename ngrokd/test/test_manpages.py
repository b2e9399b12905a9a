"""
Tests for the man pages (L{ngrokd.cli.manpages}): made as the build makes
them, rendered by man and groff without a warning, describing what the
parsers and the configuration reference hold, and installed with the
package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

import ngrokd
from ngrokd.cli import ctl_parser, daemon_parser
from ngrokd.cli.manpages import PAGES, render_all
from ngrokd.test.helpers import source_file


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SkipTest(f"{name} is not installed (Debian: man-db, groff-base)")
    return found


def subcommands(parser: object) -> list[str]:
    (action,) = [
        a
        for a in parser._actions  # type: ignore[attr-defined]
        if a.__class__.__name__ == "_SubParsersAction"
    ]
    return list(action.choices)


class ManPageTests(SynchronousTestCase):
    """
    The three pages, as C{setup.py build_man} writes them.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        render_all(self.directory, source_file("docs", "configuration.rst"))

    def page(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def rendered(self, name: str) -> str:
        """
        The page as man shows it, failing on any warning from man or groff.
        """
        ran = subprocess.run(
            [tool("man"), "--warnings=w", "-l", self.page(name)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env={
                **os.environ,
                "MANWIDTH": "80",
                "MANPAGER": "cat",
                "LC_ALL": "C.UTF-8",
            },
        )
        self.assertEqual((ran.returncode, ran.stderr), (0, ""), name)
        checked = subprocess.run(
            [tool("groff"), "-k", "-man", "-Tutf8", "-ww", "-z", self.page(name)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual((checked.returncode, checked.stderr), (0, ""), name)
        return ran.stdout

    def test_ngrokctl(self) -> None:
        """
        ngrokctl(1) renders cleanly and describes every command.
        """
        text = self.rendered("man1/ngrokctl.1")
        self.assertTrue(text.startswith("NGROKCTL(1)"), text[:80])
        for command in subcommands(ctl_parser.parser()):
            self.assertIn(f"ngrokctl {command}", text)
        self.assertIn("EXIT STATUS", text)

    def test_ngrokd(self) -> None:
        """
        ngrokd(8) renders cleanly and describes every command and what the
        signals do.
        """
        text = self.rendered("man8/ngrokd.8")
        self.assertTrue(text.startswith("NGROKD(8)"), text[:80])
        for command in subcommands(daemon_parser.parser()):
            self.assertIn(f"ngrokd {command}", text)
        self.assertIn("SIGHUP", text)

    def test_configuration(self) -> None:
        """
        ngrokd.yml(5) renders cleanly and has every section of the
        configuration reference.
        """
        text = self.rendered("man5/ngrokd.yml.5")
        self.assertTrue(text.startswith("ngrokd.yml(5)"), text[:80])
        with open(source_file("docs", "configuration.rst")) as f:
            titles = re.findall(r"(?m)^(.+)\n-{3,}$", f.read())
        self.assertTrue(titles)
        flat = " ".join(text.split())
        for title in titles:
            plain = title.replace("``", "").replace("**", "")
            self.assertIn(" ".join(plain.split()), flat)


class InstalledTests(SynchronousTestCase):
    """
    The pages installed with the package (from a wheel).
    """

    def test_installed(self) -> None:
        """
        Installed from a wheel, the package put the three pages under its
        prefix's C{share/man}, where man finds them.
        """
        top = os.path.dirname(os.path.dirname(os.path.abspath(ngrokd.__file__)))
        if os.path.exists(os.path.join(top, "setup.py")):
            raise SkipTest("run from a source tree: no pages are installed")
        for page in PAGES:
            path = os.path.join(sys.prefix, "share", "man", page)
            self.assertTrue(os.path.exists(path), path)
