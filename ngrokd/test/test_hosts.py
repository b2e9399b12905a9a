"""
Tests for the hosts file: the rendering (L{ngrokd.host.hostsection}), the
file writes (L{ngrokd.host.hostsfile}), and the service the daemon uses
(L{ngrokd.host.hosts}).
"""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from ngrokd.host.hosts import HostsService
from ngrokd.host.hostsection import BEGIN, END, pinned_names, render
from ngrokd.host.hostsfile import HostsFile, HostsFileError
from ngrokd.test.namespace import namespace
from ngrokd.test.test_netif import SynchronousThreadPool

MAPPING = {"db.ns": ip_address("10.107.0.3"), "api.ns": ip_address("10.107.0.2")}
SECTION = f"{BEGIN}\n10.107.0.2\tapi.ns\n10.107.0.3\tdb.ns\n{END}\n"
OTHER = {"new.ns": ip_address("fd00::2")}
OTHER_SECTION = f"{BEGIN}\nfd00::2\tnew.ns\n{END}\n"
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"


class RenderTests(SynchronousTestCase):
    """
    L{render} puts the mapping between the markers and leaves every other
    byte alone.
    """

    def test_appended(self) -> None:
        """
        A new section goes at the end after a blank line, one IP<TAB>name line
        per hostname, sorted by hostname.
        """
        self.assertEqual(render(HOSTS, MAPPING), HOSTS + "\n" + SECTION)

    def test_bothFamilies(self) -> None:
        """
        A name with an IPv4 and an IPv6 address gets a line for each, IPv4
        first, within the name's sorted place; the section parses again as
        ngrokd's (the lines are entries), and goes whole.
        """
        mapping = {
            "db.ns": (ip_address("fd00::3"), ip_address("10.107.0.3")),
            "api.ns": ip_address("10.107.0.2"),
        }
        section = (
            f"{BEGIN}\n10.107.0.2\tapi.ns\n10.107.0.3\tdb.ns\nfd00::3\tdb.ns\n{END}\n"
        )
        self.assertEqual(render(HOSTS, mapping), HOSTS + "\n" + section)
        self.assertEqual(render(HOSTS + "\n" + section, {}), HOSTS)

    def test_emptyFile(self) -> None:
        """
        An empty file gets just the section, and loses it again.
        """
        self.assertEqual(render("", MAPPING), SECTION)
        self.assertEqual(render(SECTION, {}), "")

    def test_replacedInPlace(self) -> None:
        """
        An existing section is rewritten where it is; the lines before and
        after it are kept as they are.
        """
        text = HOSTS + SECTION + "10.0.0.9 mine\n"
        self.assertEqual(render(text, OTHER), HOSTS + OTHER_SECTION + "10.0.0.9 mine\n")

    def test_unchanged(self) -> None:
        """
        Rendering the same mapping again gives the same text.
        """
        once = render(HOSTS, MAPPING)
        self.assertEqual(render(once, MAPPING), once)

    def test_removedWithItsBlankLine(self) -> None:
        """
        An empty mapping removes the section and the blank line added before
        it: the file is back to what it was.
        """
        self.assertEqual(render(render(HOSTS, MAPPING), {}), HOSTS)
        self.assertEqual(render(HOSTS, {}), HOSTS)

    def test_fileEndingWithBlankLine(self) -> None:
        """
        A file that ends with a blank line keeps it when the section comes
        and goes.
        """
        text = HOSTS + "\n"
        self.assertEqual(render(render(text, MAPPING), {}), text)

    def test_missingFinalNewline(self) -> None:
        """
        A file without a final newline still has none with the section, and
        gets its last line back unchanged without it.
        """
        text = HOSTS.rstrip("\n")
        with_section = render(text, MAPPING)
        self.assertEqual(with_section, HOSTS + "\n" + SECTION.rstrip("\n"))
        self.assertEqual(
            render(with_section, OTHER), HOSTS + "\n" + OTHER_SECTION.rstrip("\n")
        )
        self.assertEqual(render(with_section, {}), text)

    def test_crlf(self) -> None:
        """
        In a file with CRLF line endings the section's lines end in CRLF too.
        """
        text = HOSTS.replace("\n", "\r\n")
        with_section = render(text, MAPPING)
        self.assertEqual(with_section, text + "\r\n" + SECTION.replace("\n", "\r\n"))
        self.assertEqual(render(with_section, {}), text)

    def test_beginWithoutEnd(self) -> None:
        """
        A section cut short after BEGIN loses only its entry lines: the lines
        after them are kept (the original deleted the rest of the file).
        """
        text = f"{HOSTS}{BEGIN}\n10.107.0.9\told.ns\n10.0.0.9 mine\n# comment\n"
        self.assertEqual(
            render(text, MAPPING), f"{HOSTS}{SECTION}10.0.0.9 mine\n# comment\n"
        )
        self.assertEqual(render(text, {}), f"{HOSTS}10.0.0.9 mine\n# comment\n")

    def test_beginWithoutEndBeforeAnotherSection(self) -> None:
        """
        A BEGIN followed by another BEGIN before any END is cut short there;
        the complete section after it is still recognised.
        """
        text = f"{BEGIN}\n10.1.1.1\ta\nkeep me\n{BEGIN}\n10.1.1.2\tb\n{END}\n"
        self.assertEqual(render(text, MAPPING), f"{SECTION}keep me\n")

    def test_markersMatchWholeLines(self) -> None:
        """
        A line that merely contains a marker is not one.
        """
        text = f"10.0.0.9 x # not {BEGIN}\n# {END} neither\n"
        self.assertEqual(render(text, MAPPING), text + "\n" + SECTION)
        self.assertEqual(render(text, {}), text)

    def test_severalSectionsCollapse(self) -> None:
        """
        Several sections become one, where the first was; the others go with
        the blank lines before them.
        """
        text = f"a\n{SECTION}b\n\n{SECTION}c\n\n{OTHER_SECTION}"
        self.assertEqual(render(text, OTHER), f"a\n{OTHER_SECTION}b\nc\n")
        self.assertEqual(render(text, {}), "a\nb\nc\n")

    def test_strayEnd(self) -> None:
        """
        An END without a BEGIN is dropped; the lines around it stay.
        """
        text = f"a\n{END}\nb\n"
        self.assertEqual(render(text, MAPPING), f"a\nb\n\n{SECTION}")

    @given(
        # A last line ending in a bare CR becomes CRLF once a newline follows
        # it, and cannot be told from one afterwards.
        st.text(st.sampled_from("ab# \t\r\n")).filter(lambda t: not t.endswith("\r")),
        st.dictionaries(
            st.sampled_from(["a.ns", "b.ns", "c.ns"]),
            st.integers(2, 9).map(lambda n: ip_address(f"10.107.0.{n}")),
        ),
    )
    def test_roundTrip(self, text, mapping) -> None:
        """
        For any file without markers, adding a section and removing it gives
        back the same text, and rendering is idempotent.
        """
        with_section = render(text, mapping)
        self.assertEqual(render(with_section, mapping), with_section)
        self.assertEqual(render(with_section, {}), text)

    @given(
        st.text(st.sampled_from("ab#\t\r\n")).map(lambda t: t + "\n" if t else t),
        st.text(st.sampled_from("ab#\t\r\n")),
    )
    def test_outsidePreserved(self, before, after) -> None:
        """
        Whatever surrounds an existing section is kept byte for byte.
        """
        text = before + SECTION + after
        self.assertEqual(render(text, OTHER), before + OTHER_SECTION + after)


class PinnedNamesTests(SynchronousTestCase):
    """
    L{pinned_names}: the names a hosts file sets outside this instance's
    section, which ngrokd must not claim.
    """

    def test_outsideTheSection(self) -> None:
        """
        Every name of every line outside the section counts, aliases too,
        lowercase and without a final dot; comments do not, nor do the
        section's own names.
        """
        text = (
            "# 10.0.0.1 commented.out\n"
            "127.0.0.1\tlocalhost\n"
            "192.0.2.10 Gateway.LAN. gw  # the router\n"
            "\n"
            "not-an-address  still.meant\r\n"
            "10.0.0.5\n" + SECTION + "10.0.0.9\tafter.section\n"
        )
        self.assertEqual(
            pinned_names(text),
            {"localhost", "gateway.lan", "gw", "still.meant", "after.section"},
        )

    def test_otherInstances(self) -> None:
        """
        Another instance's section is another writer's claim: its names
        count for this instance, and this instance's count for it.
        """
        named = render(HOSTS + "\n" + SECTION, OTHER, instance="lab")
        self.assertEqual(
            pinned_names(named),
            {"localhost", "ip6-localhost", "new.ns"},
        )
        self.assertEqual(
            pinned_names(named, instance="lab"),
            {"localhost", "ip6-localhost", "api.ns", "db.ns"},
        )

    def test_unfinishedSection(self) -> None:
        """
        A section cut short (no END line) is this instance's up to its last
        entry line; the administrator's lines after it count.
        """
        text = f"{BEGIN}\n10.107.0.2\tapi.ns\n# mine\n10.0.0.9 mine.lan\n"
        self.assertEqual(pinned_names(text), {"mine.lan"})


class HostsFileTests(SynchronousTestCase):
    """
    L{HostsFile} rewrites only its section of a real file.
    """

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "hosts")
        self.hosts = HostsFile(self.path)

    def put(self, data: bytes) -> None:
        with open(self.path, "wb") as f:
            f.write(data)

    def content(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def assertOnlyHostsFile(self) -> None:
        self.assertEqual(os.listdir(self.directory), ["hosts"])

    def test_writeAndRemove(self) -> None:
        """
        write() adds the section and says so; remove() takes it out again,
        leaving the original bytes, even ones that are not UTF-8.
        """
        original = HOSTS.encode("ascii") + b"10.0.0.9\tcaf\xe9\n"
        self.put(original)
        self.assertTrue(self.hosts.write(MAPPING))
        self.assertEqual(self.content(), original + b"\n" + SECTION.encode("ascii"))
        self.assertTrue(self.hosts.remove())
        self.assertEqual(self.content(), original)
        self.assertOnlyHostsFile()

    def test_unchangedNotWritten(self) -> None:
        """
        Writing the same mapping again leaves the file alone: same inode,
        same content.
        """
        self.put(HOSTS.encode("ascii"))
        self.hosts.write(MAPPING)
        before = os.stat(self.path)
        self.assertFalse(self.hosts.write(MAPPING))
        self.assertEqual(os.stat(self.path).st_ino, before.st_ino)

    def test_attributesKept(self) -> None:
        """
        The file is replaced atomically (a new inode) with its mode, owner,
        group and extended attributes.
        """
        self.put(HOSTS.encode("ascii"))
        os.chmod(self.path, 0o640)
        root = os.geteuid() == 0
        if root:
            os.chown(self.path, 1234, 5678)
        try:
            os.setxattr(self.path, "user.ngrokd-test", b"label")
            xattr = True
        except OSError:
            xattr = False
        before = os.stat(self.path)
        self.hosts.write(MAPPING)
        after = os.stat(self.path)
        self.assertNotEqual(after.st_ino, before.st_ino)
        self.assertEqual(stat.S_IMODE(after.st_mode), 0o640)
        self.assertEqual((after.st_uid, after.st_gid), (before.st_uid, before.st_gid))
        if xattr:
            self.assertEqual(os.getxattr(self.path, "user.ngrokd-test"), b"label")
        self.assertOnlyHostsFile()

    def test_othersEditsKept(self) -> None:
        """
        Lines someone else adds between two writes survive the second write.
        """
        self.put(HOSTS.encode("ascii"))
        self.hosts.write(MAPPING)
        with open(self.path, "ab") as f:
            f.write(b"10.0.0.9\tmine\n")
        self.hosts.write(OTHER)
        self.assertEqual(
            self.content(),
            (HOSTS + "\n" + OTHER_SECTION + "10.0.0.9\tmine\n").encode("ascii"),
        )

    def test_missingFile(self) -> None:
        """
        remove() on a missing file does not create it; write() does.
        """
        self.assertFalse(self.hosts.remove())
        self.assertFalse(os.path.exists(self.path))
        self.assertTrue(self.hosts.write(MAPPING))
        self.assertEqual(self.content(), SECTION.encode("ascii"))

    def test_pinnedOfMissingFile(self) -> None:
        """
        A hosts file that is not there sets no names.
        """
        self.assertEqual(self.hosts.pinned(), frozenset())

    def test_pinnedOfFifo(self) -> None:
        """
        A FIFO in the hosts file's place is refused at once, naming the
        file, instead of blocking the reading thread for want of a writer.
        """
        os.mkfifo(self.path)
        outcome: list[object] = []

        def read() -> None:
            try:
                outcome.append(self.hosts.pinned())
            except HostsFileError as e:
                outcome.append(str(e))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(5)
        if reader.is_alive():
            # Release the blocked open before failing.
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(5)
            self.fail("reading a FIFO in the hosts file's place blocked")
        self.assertEqual(
            outcome, [f"cannot read {self.path}: not a regular file but a FIFO"]
        )

    def test_missingDirectory(self) -> None:
        """
        A hosts file in a directory that does not exist is an error naming
        it.
        """
        path = os.path.join(self.directory, "nowhere", "hosts")
        error = self.assertRaises(HostsFileError, HostsFile(path).write, MAPPING)
        self.assertIn(path, str(error))

    def test_symlinkFollowed(self) -> None:
        """
        Through a symbolic link, the file it names is written and the link
        stays a link.
        """
        self.put(HOSTS.encode("ascii"))
        link = os.path.join(self.directory, "link")
        os.symlink("hosts", link)
        HostsFile(link).write(MAPPING)
        self.assertTrue(os.path.islink(link))
        self.assertEqual(self.content(), (HOSTS + "\n" + SECTION).encode("ascii"))

    def test_waitsForOtherWriter(self) -> None:
        """
        A write waits while another cooperating writer holds the file's lock,
        then works on what that writer left, even if it replaced the file.
        """
        self.put(HOSTS.encode("ascii"))
        with open(self.path, "rb") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            writer = threading.Thread(target=self.hosts.write, args=(MAPPING,))
            writer.start()
            self.addCleanup(writer.join, 30)
            replacement = self.path + ".other"
            with open(replacement, "wb") as f:
                f.write(HOSTS.encode("ascii") + b"10.0.0.9\tmine\n")
            os.rename(replacement, self.path)
        writer.join(30)
        self.assertFalse(writer.is_alive())
        self.assertEqual(
            self.content(),
            (HOSTS + "10.0.0.9\tmine\n\n" + SECTION).encode("ascii"),
        )


#: A reader that holds a shared lock on a file through a read-only
#: descriptor, as any local user who can read /etc/hosts can.
_READER = """
import fcntl, sys, time
f = open(sys.argv[1], "rb")
fcntl.flock(f.fileno(), fcntl.LOCK_SH)
print("locked", flush=True)
time.sleep(60)
"""


class LockHeldByReaderTests(SynchronousTestCase):
    """
    Another process holding the hosts file's lock delays a write by at most
    the lock timeout, and a stop with it.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "hosts")
        with open(self.path, "w") as f:
            f.write(HOSTS + "\n" + SECTION)
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, self.path],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )

        def stop() -> None:
            reader.kill()
            reader.wait()
            assert reader.stdout is not None
            reader.stdout.close()

        self.addCleanup(stop)
        assert reader.stdout is not None
        self.assertEqual(reader.stdout.readline(), b"locked\n")

    def test_writeGivesUp(self) -> None:
        """
        The write fails after the lock timeout, naming the file and why,
        and leaves it as it was.
        """
        started = time.monotonic()
        error = self.assertRaises(
            HostsFileError, HostsFile(self.path, lock_timeout=0.5).write, MAPPING
        )
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(
            str(error),
            f"cannot lock {os.path.realpath(self.path)}: another process has held"
            " its lock for"
            " more than 0.5s",
        )
        with open(self.path) as f:
            self.assertEqual(f.read(), HOSTS + "\n" + SECTION)

    def test_stopEnds(self) -> None:
        """
        A stop that cannot remove the section ends all the same, with the
        reason logged.
        """
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        service = HostsService(ThreadReactor(), self.path)
        service.file = HostsFile(self.path, lock_timeout=0.5)
        service.running = True
        self.assertIsNone(self.successResultOf(service.stopService()))
        (error,) = [m for m in map(formatEvent, events) if "cannot lock" in m]
        self.assertIn("more than 0.5s", error)


@implementer(IReactorThreads)
class ThreadReactor(MemoryReactorClock):
    """
    A memory reactor whose threads are this one: its thread pool, and
    what a thread hands over, run work at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = SynchronousThreadPool()

    def callFromThread(
        self, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> None:
        callable(*args, **kwargs)

    def callInThread(
        self, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> None:
        callable(*args, **kwargs)

    def getThreadPool(self) -> ThreadPool:
        return self.pool

    def suggestThreadPoolSize(self, size: int) -> None:
        pass


class HoldingThreadPool(SynchronousThreadPool):
    """
    Holds the work it is given until L{run_held}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Any, ...]] = []

    def callInThreadWithCallback(self, onResult, func, *args, **kw):
        self.held.append((onResult, func, args, kw))

    def run_held(self) -> None:
        held, self.held = self.held, []
        for onResult, func, args, kw in held:
            super().callInThreadWithCallback(onResult, func, *args, **kw)


class HostsServiceTests(SynchronousTestCase):
    """
    L{HostsService} keeps the section equal to the daemon's names, from
    start to clean stop.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "hosts")
        self.service = HostsService(ThreadReactor(), self.path)
        self.writes: list[dict[str, Any]] = []
        real = self.service.file.write

        def write(mapping: Any) -> bool:
            self.writes.append(dict(mapping))
            return real(mapping)

        self.service.file.write = write  # type: ignore[method-assign]
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def put(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def content(self) -> str:
        with open(self.path) as f:
            return f.read()

    def start(self) -> None:
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def test_staleSectionReplacedAtStart(self) -> None:
        """
        A section left by a run that did not stop cleanly is gone once the
        service starts: its names are not served yet.
        """
        self.put(HOSTS + "\n" + SECTION + "10.0.0.9\tmine\n")
        self.start()
        self.assertEqual(self.content(), HOSTS + "10.0.0.9\tmine\n")

    def test_writtenOnlyWhenChanged(self) -> None:
        """
        The file is changed only when its section differs from the names:
        the same names again leave it alone, inode and all.
        """
        self.put(HOSTS)
        self.start()
        self.assertTrue(self.successResultOf(self.service.write(MAPPING)))
        before = os.stat(self.path)
        self.assertFalse(self.successResultOf(self.service.write(MAPPING)))
        after = os.stat(self.path)
        self.assertEqual(
            (after.st_ino, after.st_mtime_ns), (before.st_ino, before.st_mtime_ns)
        )
        self.assertTrue(self.successResultOf(self.service.write(OTHER)))
        self.assertEqual(self.content(), HOSTS + "\n" + OTHER_SECTION)

    def test_removedSectionRestored(self) -> None:
        """
        A section someone else removed (a tool that regenerates the hosts
        file, say) is back after the next write of the same names.
        """
        self.put(HOSTS)
        self.start()
        self.successResultOf(self.service.write(MAPPING))
        written = self.content()
        self.put(HOSTS)
        self.assertTrue(self.successResultOf(self.service.write(MAPPING)))
        self.assertEqual(self.content(), written)

    def test_othersEditsKept(self) -> None:
        """
        Edits someone else makes between two writes (lines added, a line
        changed, the section moved down) survive the next write.
        """
        self.put(HOSTS)
        self.start()
        self.successResultOf(self.service.write(MAPPING))
        edited = "# mine\n" + self.content().replace("localhost\n", "localhost me\n", 1)
        self.put(edited + "10.0.0.9\tmine\n")
        self.successResultOf(self.service.write(OTHER))
        self.assertEqual(
            self.content(),
            "# mine\n"
            + HOSTS.replace("localhost\n", "localhost me\n", 1)
            + "\n"
            + OTHER_SECTION
            + "10.0.0.9\tmine\n",
        )

    def test_removedOnStop(self) -> None:
        """
        A clean stop removes the section and leaves the rest as it was.
        """
        self.put(HOSTS)
        self.service.startService()
        self.successResultOf(self.service.write(MAPPING))
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.content(), HOSTS)
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.writes, [{n: (ip,) for n, ip in MAPPING.items()}, {}])

    def test_noSectionNoWriteAccess(self) -> None:
        """
        Without names to write and without a section in the file, the file
        is not opened for writing: a daemon in network mode needs no write
        access to it.
        """
        self.put(HOSTS)
        self.start()
        self.assertFalse(self.successResultOf(self.service.write({})))
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.writes, [])
        self.assertEqual(self.content(), HOSTS)

    def test_pinnedReadFresh(self) -> None:
        """
        L{HostsService.pinned} reads the file each time, in the pool, and
        leaves out the section's names.
        """
        self.put(HOSTS + "192.0.2.10\tgateway.lan\n")
        self.start()
        self.successResultOf(self.service.write(MAPPING))
        self.assertEqual(
            self.successResultOf(self.service.pinned()),
            {"localhost", "ip6-localhost", "gateway.lan"},
        )
        with open(self.path, "a") as f:
            f.write("192.0.2.11 db.ns\n")
        self.assertIn("db.ns", self.successResultOf(self.service.pinned()))

    def test_pinnedReadInThePool(self) -> None:
        """
        The read is work for the pool, not done on the reactor thread.
        """
        self.put(HOSTS)
        pool = HoldingThreadPool()
        service = HostsService(ThreadReactor(), self.path, threadpool=pool)
        reading = service.pinned()
        self.assertNoResult(reading)
        pool.run_held()
        self.assertEqual(self.successResultOf(reading), {"localhost", "ip6-localhost"})

    def test_pinnedReadFails(self) -> None:
        """
        When the file cannot be read (here: a directory took its place),
        the names of the last good read are kept, and why is logged once
        while it stays so.
        """
        self.put(HOSTS + "192.0.2.10\tgateway.lan\n")
        self.start()
        first = self.successResultOf(self.service.pinned())
        os.remove(self.path)
        os.mkdir(self.path)
        for _ in range(3):
            self.assertEqual(self.successResultOf(self.service.pinned()), first)
        (error,) = [m for m in map(formatEvent, self.events) if "cannot read" in m]
        self.assertIn(f"cannot read {self.path}: not a regular file", error)

    def test_failureLoggedOnceAndRetried(self) -> None:
        """
        A write that fails is logged once, naming the file, however often
        it fails; the same names are written again at the next write, and
        the recovery is logged.
        """
        os.rmdir(os.path.dirname(self.path))
        self.start()
        for _ in range(3):
            self.assertFalse(self.successResultOf(self.service.write(MAPPING)))
        errors = [m for m in map(formatEvent, self.events) if "cannot" in m]
        self.assertEqual(len(errors), 1)
        self.assertIn(self.path, errors[0])
        self.assertIn(self.path, self.service.error)
        os.mkdir(os.path.dirname(self.path))
        self.assertTrue(self.successResultOf(self.service.write(MAPPING)))
        self.assertEqual(self.content(), SECTION)
        self.assertEqual(self.service.error, "")


_WRITE_TWICE = """
import json, os, subprocess
from ipaddress import ip_address
from ngrokd.host.hostsfile import HostsFile
hosts = HostsFile("/etc/hosts")
before = os.stat("/etc/hosts").st_ino
first = hosts.write({"api.example.internal": ip_address("10.107.0.2")})
with open("/etc/hosts", "a") as f:
    f.write("10.0.0.9\\tmine.example.internal\\n")
second = hosts.write({"db.example.internal": ip_address("10.107.0.3")})
def resolve(name):
    return subprocess.run(["getent", "hosts", name], capture_output=True,
                          text=True).stdout.split()
print(json.dumps({
    "changed": [first, second],
    "same_inode": os.stat("/etc/hosts").st_ino == before,
    "db": resolve("db.example.internal"),
    "api": resolve("api.example.internal"),
    "mine": resolve("mine.example.internal"),
    "etc_leftovers": [n for n in os.listdir("/etc") if "ngrokd" in n],
}))
"""


class BindMountedHostsFileTests(SynchronousTestCase):
    """
    L{HostsFile} on a hosts file that is a bind mount, as in containers,
    inside a throwaway namespace.
    """

    def test_inPlaceAndResolved(self) -> None:
        """
        Where the hosts file cannot be renamed over (EBUSY), it is written in
        place: the system resolver finds the names, edits made by someone
        else between two writes survive, and no temporary file is left.
        """
        ns = namespace(self)
        source = os.path.abspath(self.mktemp())
        with open(source, "w") as f:
            f.write(HOSTS)
        with open("/etc/hosts", "rb") as f:
            machine_hosts = f.read()
        result = ns.run_python(_WRITE_TWICE, hosts_file=source)
        self.assertEqual(
            result,
            {
                "changed": [True, True],
                "same_inode": True,
                "db": ["10.107.0.3", "db.example.internal"],
                "api": [],
                "mine": ["10.0.0.9", "mine.example.internal"],
                "etc_leftovers": [],
            },
        )
        with open(source) as f:
            self.assertEqual(
                f.read(),
                HOSTS
                + f"\n{BEGIN}\n10.107.0.3\tdb.example.internal\n{END}\n"
                + "10.0.0.9\tmine.example.internal\n",
            )
        with open("/etc/hosts", "rb") as f:
            self.assertEqual(f.read(), machine_hosts)

    def test_resolverSeesSharedFile(self) -> None:
        """
        Commands given the same hosts file see the same names: what one
        writes, another resolves.
        """
        ns = namespace(self)
        source = os.path.abspath(self.mktemp())
        with open(source, "w") as f:
            f.write(HOSTS)
        ns.run_python(
            "from ipaddress import ip_address as a;"
            " from ngrokd.host.hosts import HostsFile;"
            "HostsFile('/etc/hosts').write({'x.ns': a('fd00::5')}); print('null')",
            hosts_file=source,
        )
        code = (
            "import json, socket; print(json.dumps(sorted({i[4][0] for i in"
            " socket.getaddrinfo('x.ns', 80, proto=socket.IPPROTO_TCP)})))"
        )
        self.assertEqual(ns.run_python(code, hosts_file=source), ["fd00::5"])
