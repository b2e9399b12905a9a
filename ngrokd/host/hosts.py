# -*- test-case-name: ngrokd.test.test_hosts -*-
"""
The ngrokd section of the hosts file, which makes endpoint names resolve to
their local addresses for every program on the machine.

L{HostsService} keeps it for the daemon, running L{HostsFile}
(L{ngrokd.host.hostsfile}) off the reactor thread: it replaces a section a
crashed run left (at start), writes only when the names change (the
original rewrote the file at every poll), removes the section on a clean
stop, and reads the names set outside the section, which ngrokd must not
claim (L{ngrokd.names}). The section's text is
L{ngrokd.host.hostsection}'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ngrokd.host.allocator import IPAddress
from ngrokd.host.hostsection import BEGIN as BEGIN
from ngrokd.host.hostsection import END as END
from ngrokd.host.hostsection import Addresses, each_address
from ngrokd.host.hostsfile import LOCK_TIMEOUT as LOCK_TIMEOUT
from ngrokd.host.hostsfile import HostsFile, HostsFileError
from ngrokd.problems import Problems

_T = TypeVar("_T")


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
        wanted = {name: tuple(each_address(ips)) for name, ips in mapping.items()}
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
