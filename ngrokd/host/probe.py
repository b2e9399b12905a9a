# -*- test-case-name: ngrokd.test.test_probe -*-
"""
Does a name resolve, as programs on this machine resolve it?

Only C{getaddrinfo} tells the truth: it goes through the resolver the
system is configured with (nsswitch, resolved's stub, C{/etc/resolver} on
macOS), which C{dig} and C{nslookup} skip. It blocks, so it runs in a
thread; a lookup that has not ended after the probe's timeout is reported
as such (the thread ends on its own when the resolver gives up).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ngrokd.host.allocator import IPAddress

#: How long a probe waits for the system's answer.
PROBE_TIMEOUT = 2.0

Lookup = Callable[..., list[tuple[Any, ...]]]


@frozen
class ProbeResult:
    """
    What the system answered for C{name}: C{addresses} found, and C{reason}
    when it did not resolve to the expected address (C{None} when it did).
    """

    name: str
    addresses: tuple[str, ...]
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.reason is None


def probe(
    reactor: IReactorFromThreads,
    clock: IReactorTime,
    threadpool: ThreadPool,
    name: str,
    expected: IPAddress,
    timeout: float = PROBE_TIMEOUT,
    lookup: Lookup = socket.getaddrinfo,
) -> Deferred[ProbeResult]:
    """
    Look C{name} up through C{lookup} (C{getaddrinfo}) in C{threadpool} and
    say whether the answer holds C{expected}.

    @return: a Deferred that never fails: a name that does not resolve, or
        to other addresses, or not within C{timeout}, gives a result with
        the reason.
    """

    def resolve() -> tuple[str, ...]:
        answers = lookup(name, None, 0, socket.SOCK_STREAM)
        return tuple(dict.fromkeys(str(answer[4][0]) for answer in answers))

    def judged(addresses: tuple[str, ...]) -> ProbeResult:
        if str(expected) in addresses:
            return ProbeResult(name, addresses, None)
        return ProbeResult(
            name,
            addresses,
            f"{name} resolved to {', '.join(addresses) or 'nothing'}, not {expected}",
        )

    def failed(failure: Failure) -> ProbeResult:
        if failure.check(TimeoutError):
            why = f"no answer within {timeout:g} s"
        elif failure.check(OSError):
            why = str(failure.value)
        else:
            why = repr(failure.value)
        return ProbeResult(name, (), f"{name} did not resolve: {why}")

    d = deferToThreadPool(reactor, threadpool, resolve)
    d.addTimeout(timeout, clock)
    return d.addCallbacks(judged, failed)
