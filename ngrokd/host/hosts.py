# -*- test-case-name: ngrokd.test.test_hosts -*-
"""
The ngrokd section of the hosts file, which makes endpoint names resolve to
their local addresses for every program on the machine.

The hosts file belongs to the administrator; ngrokd owns only the lines
between its two marker lines. Everything else is kept byte for byte, even
when the section is damaged: the original deleted the rest of the file when
its END marker was missing, matched markers as substrings, and replaced the
file's inode, losing its mode, owner and label, and never updating it at all
where it is a bind mount (fault 23).

L{render} and L{pinned_names} are the pure parts. L{HostsFile} reads,
renders and writes under a lock, atomically where it can and in place where
the file is a mount point. L{HostsService} runs it off the reactor thread
for the daemon: it replaces a section a crashed run left (at start), writes
only when the names change (the original rewrote the file at every poll),
removes the section on a clean stop, and reads the names set outside the
section, which ngrokd must not claim (L{ngrokd.names}).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ngrokd.host.allocation import IPAddress
from ngrokd.instance import hosts_markers, is_hosts_marker
from ngrokd.problems import Problems
from ngrokd.readfile import read_regular

#: The unnamed instance's markers; a named one's carry its name.
BEGIN, END = hosts_markers("")

_T = TypeVar("_T")
#: A name's addresses for its lines: one address, or several (IPv4, IPv6).
Addresses = IPAddress | tuple[IPAddress, ...]

_LINE = re.compile(r"[^\n]*\n|[^\n]+")
_ENTRY = re.compile(r"(\S+)\t(\S+)")


def _lines(text: str) -> list[str]:
    """
    C{text} split after each newline, line endings kept: only C{\\n} ends a
    line in a hosts file (unlike L{str.splitlines}).
    """
    return _LINE.findall(text)


def _ending(line: str) -> str:
    for ending in ("\r\n", "\n"):
        if line.endswith(ending):
            return ending
    return ""


def _content(line: str) -> str:
    return line[: len(line) - len(_ending(line))]


def _is_entry(line: str) -> bool:
    match = _ENTRY.fullmatch(_content(line))
    if match is None:
        return False
    try:
        ip_address(match.group(1))
    except ValueError:
        return False
    return True


def _is_blank(line: str) -> bool:
    return _content(line) == "" and line != ""


def _sections(lines: list[str], begin: str, end_: str) -> list[tuple[int, int]]:
    """
    The C{[start, end)} line ranges that are this instance's: from a BEGIN line to
    the next END line; or, when another BEGIN or the end of the file comes
    first, the BEGIN line and the entry lines right after it (what the
    original wrote before it was cut short). A stray END line is a section of
    its own. Another instance's marker line ends an unfinished section, so
    no instance's section ever takes in another's.
    """
    markers = [_content(line).strip() for line in lines]
    sections: list[tuple[int, int]] = []
    i = 0
    while i < len(lines):
        if markers[i] == end_:
            sections.append((i, i + 1))
            i += 1
        elif markers[i] == begin:
            j = i + 1
            while j < len(lines) and not is_hosts_marker(markers[j]):
                j += 1
            if j < len(lines) and markers[j] == end_:
                end = j + 1
            else:
                end = i + 1
                while end < len(lines) and _is_entry(lines[end]):
                    end += 1
            sections.append((i, end))
            i = end
        else:
            i += 1
    return sections


def render(existing: str, mapping: Mapping[str, Addresses], instance: str = "") -> str:
    """
    C{existing} hosts-file text with the section of ngrokd instance
    C{instance} holding exactly C{mapping}: one C{IP<TAB>hostname} line per
    address of each hostname, sorted by hostname (IPv4 before IPv6). Other
    instances' sections are other text.

    The section stays where it was (several collapse into the first). A new
    one is appended after a blank line. An empty mapping removes the section
    together with the blank line before it, so that adding and then removing
    a section gives back the original text, byte for byte, including a
    missing final newline. The section's lines end like its BEGIN line did,
    or a new section's like the file's first line (CRLF or LF).
    """
    lines = _lines(existing)
    newline = next((_ending(line) for line in lines if _ending(line)), "\n")
    begin, end_ = hosts_markers(instance)
    sections = _sections(lines, begin, end_)

    def is_begin(line: str) -> bool:
        return _content(line).strip() == begin

    keep = None
    if mapping:
        keep = next((s for s in sections if is_begin(lines[s[0]])), None)
    out: list[str] = []
    position = 0
    for start, end in sections:
        out.extend(lines[position:start])
        position = end
        last_ending = _ending(lines[end - 1])
        if (start, end) == keep:
            own = _ending(lines[start]) or newline
            out.extend(_section(mapping, own, last_ending, instance))
            continue
        if is_begin(lines[start]) and out and _is_blank(out[-1]):
            out.pop()
        if not last_ending and out:
            out[-1] = _content(out[-1])
    out.extend(lines[position:])
    if mapping and keep is None:
        last_ending = newline
        if out and not _ending(out[-1]):
            out[-1] += newline
            last_ending = ""
        if out:
            out.append(newline)
        out.extend(_section(mapping, newline, last_ending, instance))
    return "".join(out)


def _section(
    mapping: Mapping[str, Addresses], newline: str, last_ending: str, instance: str
) -> list[str]:
    begin, end = hosts_markers(instance)
    entries = [
        f"{ip}\t{hostname}{newline}"
        for hostname in sorted(mapping)
        for ip in _each(mapping[hostname])
    ]
    return [begin + newline, *entries, end + last_ending]


def _each(addresses: Addresses | str | Iterable[IPAddress | str]) -> list[IPAddress]:
    """
    The addresses of a name, IPv4 first.
    """
    if isinstance(addresses, IPv4Address | IPv6Address | str):
        addresses = (addresses,)
    return sorted((ip_address(ip) for ip in addresses), key=lambda ip: ip.version)


def pinned_names(existing: str, instance: str = "") -> frozenset[str]:
    """
    The names C{existing} hosts-file text sets outside the section of ngrokd
    instance C{instance}, lowercase: those of the administrator's lines and
    of other instances' sections. Every name of a line counts, aliases too,
    and a line counts even when its address is not one, since its writer
    meant the name.
    """
    lines = _lines(existing)
    begin, end = hosts_markers(instance)
    names: set[str] = set()
    position = 0
    for start, stop in [*_sections(lines, begin, end), (len(lines), len(lines))]:
        for line in lines[position:start]:
            fields = line.partition("#")[0].split()
            names.update(name.lower().removesuffix(".") for name in fields[1:])
        position = stop
    return frozenset(names)


class HostsFileError(Exception):
    """
    The hosts file could not be read or written.
    """

    def __init__(self, path: str, step: str, cause: OSError) -> None:
        super().__init__(path, step, cause)
        self.path = path
        self.step = step
        self.cause = cause

    def __str__(self) -> str:
        return f"cannot {self.step} {self.path}: {self.cause.strerror or self.cause}"


#: rename(2) fails so when the file is a mount point: Docker and Kubernetes
#: bind-mount /etc/hosts into containers.
_IN_PLACE_ERRORS = (errno.EBUSY, errno.EXDEV)
#: The most of the file a read for its names takes, in bytes.
MAX_READ = 64 * 2**20
#: Bounded retries when another writer replaces the file while we wait.
_LOCK_ATTEMPTS = 20
#: Seconds a write waits for the file's lock: any local user who can read
#: the file can hold a lock on it, and must not freeze the daemon.
LOCK_TIMEOUT = 10.0
#: Seconds between two tries for the lock.
_LOCK_POLL = 0.05


class HostsFile:
    """
    The ngrokd section of one hosts file. The methods block (on locks and
    C{fsync}): call them from a thread.

    Each call locks the file (C{flock}, shared with other cooperating
    writers; waiting at most C{lock_timeout} seconds for it), reads it
    afresh, and writes only if the section changes, so edits others make
    between two calls are kept. The new text replaces the
    file atomically, through a temporary file in the same directory that
    gets the file's mode, owner, group and extended attributes (such as its
    SELinux label). Where that cannot work (the file is a mount point, or
    its owner or attributes cannot be copied) it is rewritten in place. A
    symbolic link is followed: the file it names is written, the link kept.
    """

    log = Logger()

    def __init__(
        self, path: str, lock_timeout: float = LOCK_TIMEOUT, instance: str = ""
    ) -> None:
        self.path = path
        self.instance = instance
        self._in_place = False
        self._lock_timeout = lock_timeout

    def write(self, mapping: Mapping[str, Addresses]) -> bool:
        """
        Make the section hold exactly C{mapping} (no section if empty).

        @return: whether the file changed.
        @raise HostsFileError: naming the file and what failed.
        """
        path = os.path.realpath(self.path)
        fd = self._open_locked(path, create=bool(mapping))
        if fd is None:
            return False
        try:
            data = self._read(fd, path)
            old = data.decode("utf-8", "surrogateescape")
            new = render(old, mapping, self.instance).encode("utf-8", "surrogateescape")
            if new == data:
                return False
            if self._in_place or not self._replace(fd, path, new):
                self._write_in_place(fd, path, new)
            return True
        finally:
            os.close(fd)

    def remove(self) -> bool:
        """
        Remove the section, as on a clean stop.

        @return: whether the file changed.
        """
        return self.write({})

    def has_section(self) -> bool:
        """
        Whether the file seems to hold an ngrokd section, from a read that
        needs no write access and takes no lock: so that a daemon that never
        writes names (network mode, not root) need not open the file for
        writing. When the file cannot be read, C{True}: L{write} says why.
        """
        try:
            text = self._read_text()
        except HostsFileError:
            return True
        return render(text, {}, self.instance) != text

    def pinned(self) -> frozenset[str]:
        """
        The names the file sets outside this instance's section
        (L{pinned_names}), from a read that needs no write access and takes
        no lock. No file sets none.

        @raise HostsFileError: the file cannot be read.
        """
        return pinned_names(self._read_text(), self.instance)

    def _read_text(self) -> str:
        """
        The file's text (C{""} when there is no file), read so that a FIFO
        in its place cannot block the read (L{read_regular}).

        @raise HostsFileError: the file cannot be read, is not a file, or
            is larger than L{MAX_READ}.
        """
        try:
            data, _ = read_regular(self.path, MAX_READ + 1)
        except FileNotFoundError:
            return ""
        except OSError as e:
            raise HostsFileError(self.path, "read", e) from e
        if len(data) > MAX_READ:
            raise HostsFileError(
                self.path,
                "read",
                OSError(errno.EFBIG, f"larger than {MAX_READ // 2**20} MiB"),
            )
        return data.decode("utf-8", "surrogateescape")

    def _open_locked(self, path: str, create: bool) -> int | None:
        """
        Open and lock the file that is at C{path} once the lock is held:
        another writer may have replaced it while we waited for the lock.
        """
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        deadline = time.monotonic() + self._lock_timeout
        for _ in range(_LOCK_ATTEMPTS):
            try:
                fd = os.open(path, flags, 0o644)
            except FileNotFoundError as e:
                if not create:
                    return None
                raise HostsFileError(path, "create", e) from e
            except OSError as e:
                raise HostsFileError(path, "open", e) from e
            try:
                if not _lock(fd, deadline):
                    raise BlockingIOError(
                        errno.EWOULDBLOCK,
                        "another process has held its lock for more than"
                        f" {self._lock_timeout:g}s",
                    )
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    return fd
            except FileNotFoundError:
                pass
            except OSError as e:
                os.close(fd)
                raise HostsFileError(path, "lock", e) from e
            os.close(fd)
        raise HostsFileError(
            path,
            "lock",
            OSError(errno.EAGAIN, f"replaced {_LOCK_ATTEMPTS} times while waiting"),
        )

    def _read(self, fd: int, path: str) -> bytes:
        chunks = []
        offset = 0
        try:
            while chunk := os.pread(fd, 65536, offset):
                chunks.append(chunk)
                offset += len(chunk)
        except OSError as e:
            raise HostsFileError(path, "read", e) from e
        return b"".join(chunks)

    def _replace(self, fd: int, path: str, data: bytes) -> bool:
        """
        Replace the file by a copy holding C{data}.

        @return: C{False} if the file must be written in place instead.
        """
        directory = os.path.dirname(path)
        try:
            tmp_fd, temporary = tempfile.mkstemp(
                prefix=f".{os.path.basename(path)}.ngrokd-", dir=directory
            )
        except OSError as e:
            self._fall_back(path, "create a temporary file beside", e)
            return False
        try:
            try:
                self._copy_attributes(fd, tmp_fd)
            except OSError as e:
                self._fall_back(path, "give a copy the owner and attributes of", e)
                return False
            step = "write"
            try:
                _write_all(tmp_fd, data)
                step = "fsync"
                os.fsync(tmp_fd)
                step = "rename over"
                os.rename(temporary, path)
            except OSError as e:
                if step == "rename over" and e.errno in _IN_PLACE_ERRORS:
                    self._fall_back(path, "rename over", e)
                    return False
                raise HostsFileError(path, f"{step} a copy of", e) from e
            temporary = ""
        finally:
            os.close(tmp_fd)
            if temporary:
                os.unlink(temporary)
        try:
            _fsync_directory(directory)
        except OSError as e:
            raise HostsFileError(directory, "fsync", e) from e
        return True

    @staticmethod
    def _copy_attributes(source: int, target: int) -> None:
        status = os.fstat(source)
        os.fchown(target, status.st_uid, status.st_gid)
        os.fchmod(target, status.st_mode & 0o7777)
        if not hasattr(os, "listxattr"):
            return  # macOS: Python has no xattr calls there, nor SELinux labels.
        try:
            names = os.listxattr(source)
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
            names = []
        for name in names:
            os.setxattr(target, name, os.getxattr(source, name))

    def _fall_back(self, path: str, step: str, error: OSError) -> None:
        self._in_place = True
        self.log.info(
            "cannot {step} {path} ({error}); writing it in place from now on",
            step=step,
            path=path,
            error=error.strerror,
        )

    def _write_in_place(self, fd: int, path: str, data: bytes) -> None:
        step = "write"
        try:
            _write_all(fd, data)
            step = "truncate"
            os.ftruncate(fd, len(data))
            step = "fsync"
            os.fsync(fd)
        except OSError as e:
            raise HostsFileError(path, f"{step} (in place)", e) from e


def _lock(fd: int, deadline: float) -> bool:
    """
    Lock C{fd} exclusively, trying until C{deadline} (of L{time.monotonic});
    whether it is locked.
    """
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
        time.sleep(_LOCK_POLL)


def _write_all(fd: int, data: bytes) -> None:
    offset = 0
    while offset < len(data):
        offset += os.pwrite(fd, data[offset:], offset)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HostsService(Service):
    """
    Keeps the ngrokd section of the hosts file at C{path} equal to the names
    the daemon serves in virtual mode.

    Writes run one at a time in a thread of C{threadpool} (by default the
    reactor's), in the order they were asked for. Each one reads the file and
    changes it only when its section differs from the names, so a section
    that someone else removed or changed is put back at the next L{write}
    while an unchanged file is never rewritten. A write that fails is a
    problem of C{problems} (said once, summarised while it goes on, shown in
    status) and is tried again at the next L{write}. A section that cannot
    be removed when the service stops is logged with the names it holds.

    L{pinned} reads the names set outside the section the same way, one
    read or write at a time.

    @ivar error: why the last write failed (empty when it worked).
    @ivar written: the names the section holds, as last written.
    """

    name = "hosts"
    log = Logger()

    def __init__(
        self,
        reactor: IReactorThreads,
        path: str,
        threadpool: ThreadPool | None = None,
        instance: str = "",
        problems: Problems | None = None,
    ) -> None:
        self.file = HostsFile(path, instance=instance)
        self._reactor = reactor
        self._threadpool = threadpool
        self._problems = (
            problems if problems is not None else Problems(IReactorTime(reactor))
        )
        self._what = f"writing the names to {path}"
        self._lock = DeferredLock()
        self.error = ""
        self.written: dict[str, tuple[IPAddress, ...]] = {}
        #: The names of the last read that worked, and why the last read
        #: failed (empty when it worked).
        self._pinned: frozenset[str] = frozenset()
        self._read_error = ""

    def startService(self) -> None:
        """
        Remove the section an earlier run left, if it did not stop cleanly:
        until the first reconcile nothing is served, so no name is valid.
        """
        Service.startService(self)
        self.write({})

    def stopService(self) -> Deferred[None]:
        """
        Remove the section; fires once it is gone (or failed to go, logged).
        """
        if not self.running:
            return succeed(None)
        Service.stopService(self)
        removing: Deferred[Any] = self.write({})
        return removing.addCallback(lambda _: None)

    def write(
        self, mapping: Mapping[str, IPAddress | str | Iterable[IPAddress | str]]
    ) -> Deferred[bool]:
        """
        Make the section hold C{mapping}, hostname to address or addresses
        (no section if it is empty).

        @return: fires with whether the file changed. A L{HostsFileError}
            is logged, not passed on.
        """
        wanted = {name: tuple(_each(ips)) for name, ips in mapping.items()}
        d = self._in_thread(self._write_file, wanted)

        def written(changed: bool) -> bool:
            self._problems.cleared(self._what)
            self.error = ""
            self.written = wanted
            if changed and wanted:
                self.log.info(
                    "wrote {count} names to the ngrokd section of {path}",
                    count=len(wanted),
                    path=self.file.path,
                )
            elif changed:
                self.log.info(
                    "removed the ngrokd section from {path}", path=self.file.path
                )
            return changed

        def failed(failure: Failure) -> bool:
            failure.trap(HostsFileError)
            self.error = str(failure.value)
            if not self.running and not wanted:
                self._left(self.error)
            else:
                self._problems.failed(
                    self._what,
                    self.error,
                    "endpoint names do not resolve until it can be written",
                )
            return False

        return d.addCallbacks(written, failed)

    def _left(self, error: str) -> None:
        """
        Say what stays in the file after the section could not be removed
        at a stop.
        """
        names = ", ".join(
            f"{name} {ip}" for name, ips in sorted(self.written.items()) for ip in ips
        )
        self.log.error(
            "stopping: {error}; the ngrokd section of {path} stays, with"
            " {names}, until the next start replaces it",
            error=error,
            path=self.file.path,
            names=names or "the names an earlier run wrote",
        )

    def pinned(self) -> Deferred[frozenset[str]]:
        """
        The names the file sets outside ngrokd's section, read afresh. When
        it cannot be read, the names of the last read that worked (the
        reason is logged once, while it stays the same).
        """

        def read(names: frozenset[str]) -> frozenset[str]:
            self._pinned, self._read_error = names, ""
            return names

        def failed(failure: Failure) -> frozenset[str]:
            failure.trap(HostsFileError)
            reason = str(failure.value)
            if reason != self._read_error:
                self.log.error(
                    "{error}; the names it sets are not known, so only those"
                    " of its last read are kept from endpoints",
                    error=reason,
                )
            self._read_error = reason
            return self._pinned

        return self._in_thread(self.file.pinned).addCallbacks(read, failed)

    def _write_file(self, wanted: Mapping[str, Addresses]) -> bool:
        if not wanted and not self.file.has_section():
            return False
        return self.file.write(wanted)

    def _in_thread(self, work: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run C{work} in the pool once the reads and writes asked for before
        it are done.
        """
        pool = self._threadpool or self._reactor.getThreadPool()
        return self._lock.run(deferToThreadPool, self._reactor, pool, work, *args)
