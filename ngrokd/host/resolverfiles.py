# -*- test-case-name: ngrokd.test.test_resolverfiles -*-
"""
ngrokd's DNS server registered with macOS's resolver: one file
C{/etc/resolver/DOMAIN} per routed domain, with C{nameserver} and C{port}
lines, so the server needs no root port 53 there.

Each file we write starts with L{MARK}: only such files are ever replaced
or removed, so a file someone else wrote for one of our domains is left as
it is, and reported. The directory's marked files are made exactly the
wanted ones at each call, which also sweeps files a crashed run left. The
files are written atomically (L{ngrokd.atomic}) in a thread, and after any
change the resolver's cache is flushed (C{dscacheutil -flushcache}, then a
HUP to C{mDNSResponder}), as a changed file may otherwise not be read.

Only C{getaddrinfo} (and programs using it) reads these files; C{dig},
C{nslookup} and C{host} do not.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping
from functools import partial

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorFromThreads, IReactorProcess
from twisted.internet.threads import deferToThreadPool
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.threadpool import ThreadPool

from ngrokd.atomic import AtomicWriteError, write_atomic
from ngrokd.endpoints import is_dns_name
from ngrokd.host.allocator import IPAddress
from ngrokd.host.netif.darwin import Runner
from ngrokd.readfile import read_regular

RESOLVER_DIRECTORY = "/etc/resolver"
#: The first line of every file ngrokd writes.
MARK = b"# Written by ngrokd, which removes this file when it stops.\n"
#: What flushes the resolver's cache, in order.
FLUSH_COMMANDS = (
    ("/usr/bin/dscacheutil", ("-flushcache",)),
    ("/usr/bin/killall", ("-HUP", "mDNSResponder")),
)
#: A file longer than this is not one of ours: no more of it is read.
_READ_LIMIT = 4096


def resolver_file(address: IPAddress, port: int) -> bytes:
    """
    The content of a file sending a domain's lookups to C{address}:C{port}.
    """
    return MARK + f"nameserver {address}\nport {port}\n".encode()


@frozen
class FilesPlan:
    """
    What to do in the directory: the domains whose files to C{write} and
    to C{remove}, and those C{refused} (a file that is not ours is there).
    """

    write: tuple[str, ...]
    remove: tuple[str, ...]
    refused: tuple[str, ...]


def plan_files(
    existing: Mapping[str, bytes | None], wanted: Mapping[str, bytes]
) -> FilesPlan:
    """
    The changes that make our files exactly C{wanted}, given the C{existing}
    files' content (C{None}: not readable, so not ours).
    """
    write, refused = [], []
    for domain, content in sorted(wanted.items()):
        there = existing.get(domain, b"")
        if there == content:
            continue
        if domain in existing and not _ours(there):
            refused.append(domain)
        else:
            write.append(domain)
    remove = sorted(d for d, c in existing.items() if d not in wanted and _ours(c))
    return FilesPlan(tuple(write), tuple(remove), tuple(refused))


def _ours(content: bytes | None) -> bool:
    return content is not None and content.startswith(MARK)


@frozen
class FilesResult:
    """
    What a call changed, and C{problems}: one line each (a refused domain, a
    file that could not be written or removed, a flush that failed).
    """

    written: tuple[str, ...]
    removed: tuple[str, ...]
    problems: tuple[str, ...]


class ResolverFiles:
    """
    Our files in C{directory}, and the cache flush after each change.

    @param run: runs a command (default: L{getProcessOutputAndValue} with
        C{reactor}).
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        directory: str = RESOLVER_DIRECTORY,
        run: Runner | None = None,
    ) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._directory = directory
        self._run: Runner = run or partial(
            getProcessOutputAndValue, reactor=IReactorProcess(reactor)
        )
        self._lock = DeferredLock()

    def apply(
        self, domains: Iterable[str], address: IPAddress, port: int
    ) -> Deferred[FilesResult]:
        """
        Send C{domains} to C{address}:C{port}, and no other domain.
        """
        content = resolver_file(address, port)
        return self._sync({domain: content for domain in domains})

    def remove(self) -> Deferred[FilesResult]:
        """
        Remove every file of ours (at a clean stop).
        """
        return self._sync({})

    def _sync(self, wanted: dict[str, bytes]) -> Deferred[FilesResult]:
        async def sync() -> FilesResult:
            written, removed, problems = await deferToThreadPool(
                self._reactor, self._threadpool, self._change, wanted
            )
            if written or removed:
                problems += await self._flush()
            return FilesResult(written, removed, problems)

        return self._lock.run(lambda: Deferred.fromCoroutine(sync()))

    # In the pool's thread.

    def _change(
        self, wanted: dict[str, bytes]
    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        problems = [
            f"{d!r} is not a DNS name: no file" for d in wanted if not is_dns_name(d)
        ]
        wanted = {d: c for d, c in wanted.items() if is_dns_name(d)}
        if wanted:
            try:
                os.makedirs(self._directory, 0o755, exist_ok=True)
            except OSError as e:
                return (), (), (f"cannot make {self._directory}: {e.strerror}",)
        plan = plan_files(self._existing(), wanted)
        problems += [
            f"{self._path(d)} is not ngrokd's (no mark): left as it is,"
            f" so {d} is not sent to ngrokd"
            for d in plan.refused
        ]
        written, removed = [], []
        for domain in plan.write:
            try:
                write_atomic(self._path(domain), wanted[domain], 0o644)
            except AtomicWriteError as e:
                problems.append(str(e))
            else:
                written.append(domain)
        for domain in plan.remove:
            try:
                os.unlink(self._path(domain))
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"cannot remove {self._path(domain)}: {e.strerror}")
                continue
            removed.append(domain)
        return tuple(written), tuple(removed), tuple(problems)

    def _existing(self) -> dict[str, bytes | None]:
        """
        The files named like domains in the directory, with their first
        bytes (C{None} for one that cannot be read as a file).
        """
        try:
            names = os.listdir(self._directory)
        except FileNotFoundError:
            return {}
        found: dict[str, bytes | None] = {}
        for name in names:
            if not is_dns_name(name):
                continue
            try:
                found[name] = read_regular(self._path(name), _READ_LIMIT)[0]
            except OSError as e:
                if e.errno != errno.ENOENT:
                    found[name] = None
        return found

    def _path(self, domain: str) -> str:
        return os.path.join(self._directory, domain)

    # Back on the reactor.

    async def _flush(self) -> tuple[str, ...]:
        problems = []
        for executable, args in FLUSH_COMMANDS:
            try:
                out, err, code = await self._run(executable, args)
            except Exception as e:
                # A signal ends it with a tuple, not an exception.
                problems.append(f"{executable} failed: {e!r}")
                continue
            if code != 0:
                said = (err.strip() or out.strip()).decode("utf-8", "replace")
                problems.append(
                    f"{' '.join([executable, *args])} exited with {code}: {said}"
                )
        return tuple(problems)
