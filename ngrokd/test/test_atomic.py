"""
Tests for L{ngrokd.atomic}.
"""

from __future__ import annotations

import errno
import os
import stat

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ngrokd.atomic import AtomicWriteError, read_if_exists, write_atomic


def _failing(error: int):
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(error, os.strerror(error))

    return fail


class WriteAtomicTests(SynchronousTestCase):
    """
    L{write_atomic} replaces a file completely or not at all.
    """

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "tls.key")

    def assertNoTemporaryFiles(self) -> None:
        self.assertEqual([n for n in os.listdir(self.directory) if n != "tls.key"], [])

    def test_writesContentWithMode(self) -> None:
        """
        The file holds exactly the data, with the requested mode whatever the
        umask, and nothing else is left in the directory.
        """
        old = os.umask(0o077)
        self.addCleanup(os.umask, old)
        write_atomic(self.path, b"secret", 0o644)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"secret")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o644)
        self.assertNoTemporaryFiles()

    def test_replacesAndTightensMode(self) -> None:
        """
        Rewriting an existing 0644 file with mode 0600 leaves a 0600 file.
        """
        write_atomic(self.path, b"old", 0o644)
        write_atomic(self.path, b"new", 0o600)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"new")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_temporaryFileIsPrivateBeforeContent(self) -> None:
        """
        Bytes of a 0600 file are never written to a file others can read: the
        temporary file already has its final mode when data is written.
        """
        modes = []
        real_fsync = os.fsync

        def recording_fsync(fd: int) -> None:
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
            real_fsync(fd)

        self.patch(os, "fsync", recording_fsync)
        write_atomic(self.path, b"key", 0o600)
        self.assertEqual(modes[0], 0o600)

    def test_owner(self) -> None:
        """
        A file written by root for another user has that user and group
        before it takes the old file's place, so it is never root's.
        """
        if os.getuid() != 0:
            raise SkipTest("only root can give a file to another user")
        owners = []
        real_fsync = os.fsync

        def recording_fsync(fd: int) -> None:
            info = os.fstat(fd)
            owners.append((info.st_uid, info.st_gid))
            real_fsync(fd)

        self.patch(os, "fsync", recording_fsync)
        write_atomic(self.path, b"config", 0o640, owner=(65534, 65533))
        self.assertEqual(owners[0], (65534, 65533))
        info = os.stat(self.path)
        self.assertEqual((info.st_uid, info.st_gid), (65534, 65533))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o640)

    def test_ownerRefused(self) -> None:
        """
        When the owner cannot be set, the old file is intact and the error
        names the path and the step.
        """
        write_atomic(self.path, b"old", 0o600)
        self.patch(os, "fchown", _failing(errno.EPERM))
        e = self.assertRaises(
            AtomicWriteError, write_atomic, self.path, b"new", 0o600, owner=(1, 1)
        )
        self.assertIn("set its owner", str(e))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertNoTemporaryFiles()

    def test_renameFailureKeepsOldContent(self) -> None:
        """
        When the final rename fails, the old file is intact, the error names
        the path and the failed step, and no temporary file remains.
        """
        write_atomic(self.path, b"old", 0o600)
        self.patch(os, "replace", _failing(errno.EACCES))
        e = self.assertRaises(AtomicWriteError, write_atomic, self.path, b"new", 0o600)
        self.assertIn(self.path, str(e))
        self.assertIn("rename", str(e))
        self.assertEqual(e.errno, errno.EACCES)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertNoTemporaryFiles()

    def test_diskFullKeepsOldContent(self) -> None:
        """
        ENOSPC while making the data durable leaves the old content and is
        reported as an L{OSError} naming the file.
        """
        write_atomic(self.path, b"old", 0o644)
        self.patch(os, "fsync", _failing(errno.ENOSPC))
        e = self.assertRaises(OSError, write_atomic, self.path, b"new", 0o644)
        self.assertIsInstance(e, AtomicWriteError)
        self.assertEqual(e.errno, errno.ENOSPC)
        self.assertIn("No space left on device", str(e))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertNoTemporaryFiles()

    def test_directoryIsAFile(self) -> None:
        """
        A path whose directory is really a regular file fails (even as root)
        with an error naming the path.
        """
        blocker = os.path.join(self.directory, "file")
        with open(blocker, "wb"):
            pass
        target = os.path.join(blocker, "operator_id")
        e = self.assertRaises(AtomicWriteError, write_atomic, target, b"x", 0o644)
        self.assertEqual(e.errno, errno.ENOTDIR)
        self.assertIn(target, str(e))


class ReadIfExistsTests(SynchronousTestCase):
    """
    L{read_if_exists} tells a missing file from an unreadable one.
    """

    def test_missing(self) -> None:
        """
        A missing file is C{None}.
        """
        self.assertIsNone(read_if_exists(self.mktemp()))

    def test_present(self) -> None:
        """
        A file's bytes come back as they are.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"\x00data\n")
        self.assertEqual(read_if_exists(path), b"\x00data\n")

    def test_unreadable(self) -> None:
        """
        Anything but absence is raised: here, a directory.
        """
        path = self.mktemp()
        os.mkdir(path)
        self.assertRaises(IsADirectoryError, read_if_exists, path)


class LeftoverTests(SynchronousTestCase):
    """
    Temporary files of a write that was killed do not pile up.
    """

    def test_leftoversRemoved(self) -> None:
        """
        The next write of a file removes the temporary files an earlier,
        killed write of it left, and no one else's.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        stale = os.path.join(directory, ".state.json.k1ll3d.tmp")
        other = os.path.join(directory, ".other.json.k1ll3d.tmp")
        for path in (stale, other):
            with open(path, "wb") as f:
                f.write(b"{")
        write_atomic(os.path.join(directory, "state.json"), b"{}", 0o644)
        self.assertEqual(
            sorted(os.listdir(directory)), [".other.json.k1ll3d.tmp", "state.json"]
        )
