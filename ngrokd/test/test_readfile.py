"""
Tests for L{ngrokd.readfile}: a file a person names is read without ever
waiting on it.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from ngrokd.readfile import NotRegularFile, read_regular

#: A program whose read waits forever (a plain open of a FIFO), given up
#: after a moment; then it stops its reactor and should end.
_STUCK = """
import sys
from twisted.internet import reactor
from ngrokd.readfile import in_own_thread
done = in_own_thread(
    reactor, reactor, 0.2, lambda: open(sys.argv[1]).read(), lambda: OSError("late")
)
done.addErrback(lambda failure: print(failure.getErrorMessage(), flush=True))
done.addBoth(lambda _: reactor.stop())
reactor.run()
"""


class ReadRegularTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def path(self, name: str) -> str:
        return os.path.join(self.base, name)

    def test_regularFile(self) -> None:
        """
        A regular file is read, through a symbolic link too, up to the
        bound; its status comes with it.
        """
        with open(self.path("file"), "wb") as f:
            f.write(b"0123456789")
        os.chmod(self.path("file"), 0o640)
        os.symlink("file", self.path("link"))
        data, status = read_regular(self.path("link"), 4)
        self.assertEqual((data, status.st_mode & 0o777), (b"0123", 0o640))
        self.assertEqual(read_regular(self.path("file"), 100)[0], b"0123456789")

    def test_fifoRefusedAtOnce(self) -> None:
        """
        A FIFO no one writes to is refused, not waited on (a blocking open
        would never return and hang this test).
        """
        os.mkfifo(self.path("fifo"))
        error = self.assertRaises(NotRegularFile, read_regular, self.path("fifo"), 10)
        self.assertEqual(error.strerror, "not a regular file but a FIFO")
        self.assertEqual(error.filename, self.path("fifo"))

    def test_otherKindsRefused(self) -> None:
        """
        A directory and a device are refused, saying what they are; a
        missing file is the usual error.
        """
        for path, kind in (
            (self.base, "a directory"),
            ("/dev/zero", "a character device"),
        ):
            error = self.assertRaises(NotRegularFile, read_regular, path, 10)
            self.assertEqual(error.strerror, f"not a regular file but {kind}")
        self.assertRaises(FileNotFoundError, read_regular, self.path("none"), 10)


class InOwnThreadTests(SynchronousTestCase):
    def test_stuckReadDoesNotHoldTheExit(self) -> None:
        """
        A read that never returns fails with the caller's error once its
        time is up, and the process still ends when its reactor stops.
        """
        fifo = os.path.abspath(self.mktemp())
        os.mkfifo(fifo)
        ran = subprocess.run(
            [sys.executable, "-c", _STUCK, fifo],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((ran.returncode, ran.stdout), (0, "late\n"), ran.stderr)
