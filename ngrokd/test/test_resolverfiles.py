"""
Tests for L{ngrokd.host.resolverfiles}: macOS's C{/etc/resolver} files,
written in a temporary directory, with the cache-flush commands faked.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from ipaddress import ip_address

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.host.resolverfiles import (
    FLUSH_COMMANDS,
    MARK,
    FilesResult,
    ResolverFiles,
    plan_files,
    resolver_file,
)
from ngrokd.test.test_netif import ImmediateReactor, SynchronousThreadPool

SERVER = ip_address("127.0.0.1")
PORT = 5353
OURS = MARK + b"nameserver 127.0.0.1\nport 5353\n"


class PlanTests(SynchronousTestCase):
    """
    The pure decision: what to write, remove and refuse.
    """

    def test_plan(self) -> None:
        """
        Missing or stale files of ours are written, unchanged ones left,
        unwanted ones of ours removed; a file without our mark (or one that
        could not be read) is never written over nor removed.
        """
        stale = MARK + b"nameserver 127.0.0.9\nport 53\n"
        plan = plan_files(
            {
                "same.prod": OURS,
                "stale.prod": stale,
                "theirs.prod": b"nameserver 192.0.2.1\n",
                "gone.prod": OURS,
                "other.test": b"nameserver 192.0.2.1\n",
                "unreadable.prod": None,
            },
            {
                "same.prod": OURS,
                "stale.prod": OURS,
                "new.prod": OURS,
                "theirs.prod": OURS,
                "unreadable.prod": OURS,
            },
        )
        self.assertEqual(plan.write, ("new.prod", "stale.prod"))
        self.assertEqual(plan.remove, ("gone.prod",))
        self.assertEqual(plan.refused, ("theirs.prod", "unreadable.prod"))

    def test_content(self) -> None:
        """
        A file is our mark, then the server's address and port.
        """
        self.assertEqual(
            resolver_file(ip_address("fd00::1"), 53),
            MARK + b"nameserver fd00::1\nport 53\n",
        )


class ResolverFilesTests(SynchronousTestCase):
    """
    L{ResolverFiles} on a real directory.
    """

    def setUp(self) -> None:
        root = tempfile.mkdtemp(prefix="ngrokd-resolver-")
        self.addCleanup(shutil.rmtree, root, True)
        self.directory = os.path.join(root, "etc", "resolver")
        self.commands: list[tuple[str, ...]] = []
        self.exit = 0
        self.files = ResolverFiles(
            ImmediateReactor(), SynchronousThreadPool(), self.directory, self.command
        )

    def command(
        self, executable: str, args: Sequence[str]
    ) -> Deferred[tuple[bytes, bytes, int]]:
        self.commands.append((executable, *args))
        return succeed((b"", b"no mDNSResponder here" if self.exit else b"", self.exit))

    def contents(self) -> dict[str, bytes]:
        found = {}
        for name in sorted(os.listdir(self.directory)):
            with open(os.path.join(self.directory, name), "rb") as f:
                found[name] = f.read()
        return found

    def apply(self, *domains: str) -> FilesResult:
        return self.successResultOf(self.files.apply(domains, SERVER, PORT))

    def put(self, name: str, content: bytes) -> None:
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, name), "wb") as f:
            f.write(content)

    def test_write(self) -> None:
        """
        One file per domain, made with its directory, readable by all
        (mode 0644); then the cache is flushed, dscacheutil first.
        """
        result = self.apply("web.prod", "apps.prod")
        self.assertEqual(self.contents(), {"apps.prod": OURS, "web.prod": OURS})
        mode = os.stat(os.path.join(self.directory, "web.prod")).st_mode
        self.assertEqual(stat.S_IMODE(mode), 0o644)
        self.assertEqual(result, FilesResult(("apps.prod", "web.prod"), (), ()))
        self.assertEqual(
            self.commands,
            [
                ("/usr/bin/dscacheutil", "-flushcache"),
                ("/usr/bin/killall", "-HUP", "mDNSResponder"),
            ],
        )
        self.assertEqual(len(FLUSH_COMMANDS), 2)

    def test_unchanged(self) -> None:
        """
        Applying the same again writes nothing and flushes nothing.
        """
        self.apply("web.prod")
        self.commands.clear()
        self.assertEqual(self.apply("web.prod"), FilesResult((), (), ()))
        self.assertEqual(self.commands, [])

    def test_changed(self) -> None:
        """
        A domain no longer wanted loses its file, a new server address or
        port rewrites the files, and the cache is flushed.
        """
        self.apply("web.prod", "db.prod")
        self.commands.clear()
        result = self.successResultOf(
            self.files.apply(["web.prod"], ip_address("127.0.0.2"), 53)
        )
        self.assertEqual(result, FilesResult(("web.prod",), ("db.prod",), ()))
        self.assertEqual(
            self.contents(), {"web.prod": MARK + b"nameserver 127.0.0.2\nport 53\n"}
        )
        self.assertEqual(len(self.commands), 2)

    def test_notOursRefused(self) -> None:
        """
        A file without our mark for one of our domains is left as it is and
        reported; the other domains get their files.
        """
        self.put("web.prod", b"nameserver 192.0.2.1\n")
        result = self.apply("web.prod", "db.prod")
        self.assertEqual(
            self.contents(), {"db.prod": OURS, "web.prod": b"nameserver 192.0.2.1\n"}
        )
        self.assertEqual(result.written, ("db.prod",))
        (problem,) = result.problems
        self.assertIn(os.path.join(self.directory, "web.prod"), problem)
        self.assertIn("not ngrokd's", problem)

    def test_removeOnlyOurs(self) -> None:
        """
        remove() takes every file of ours away, a leftover of an earlier run
        too, and no one else's; the directory stays.
        """
        self.put("corp.example", b"nameserver 192.0.2.1\n")
        self.put("left.prod", OURS)
        self.apply("web.prod")
        self.commands.clear()
        result = self.successResultOf(self.files.remove())
        self.assertEqual(result.removed, ("web.prod",))
        self.assertEqual(self.contents(), {"corp.example": b"nameserver 192.0.2.1\n"})
        self.assertEqual(len(self.commands), 2)

    def test_leftoversSwept(self) -> None:
        """
        Files of ours a crashed run left for domains no longer wanted are
        removed by the first apply.
        """
        self.put("left.prod", OURS)
        result = self.apply("web.prod")
        self.assertEqual(result.removed, ("left.prod",))
        self.assertEqual(self.contents(), {"web.prod": OURS})

    def test_flushFails(self) -> None:
        """
        A flush command that fails is reported with its exit code and what
        it said; the files are written all the same.
        """
        self.exit = 1
        result = self.apply("web.prod")
        self.assertEqual(result.written, ("web.prod",))
        self.assertIn(
            "/usr/bin/killall -HUP mDNSResponder exited with 1: no mDNSResponder here",
            result.problems,
        )

    def test_notDomains(self) -> None:
        """
        A domain that is not a DNS name (a path) gets no file, and is
        reported; nothing is written outside the directory.
        """
        result = self.apply("../../escape", "web.prod")
        self.assertEqual(result.written, ("web.prod",))
        self.assertIn("'../../escape' is not a DNS name: no file", result.problems)
        self.assertEqual(
            sorted(os.listdir(os.path.dirname(os.path.dirname(self.directory)))),
            ["etc"],
        )

    def test_fifoNotRead(self) -> None:
        """
        A FIFO named like a domain is never opened for a blocking read, and
        never taken for ours.
        """
        os.makedirs(self.directory)
        os.mkfifo(os.path.join(self.directory, "web.prod"))
        result = self.apply("web.prod")
        self.assertEqual(result.written, ())
        self.assertEqual(len(result.problems), 1)
        self.successResultOf(self.files.remove())
        self.assertTrue(
            stat.S_ISFIFO(os.stat(os.path.join(self.directory, "web.prod")).st_mode)
        )

    def test_writeFails(self) -> None:
        """
        A directory that cannot be made is reported, naming it.
        """
        os.makedirs(os.path.dirname(self.directory))
        with open(self.directory, "w"):
            pass
        result = self.apply("web.prod")
        self.assertEqual(result.written, ())
        self.assertIn(f"cannot make {self.directory}", result.problems[0])
