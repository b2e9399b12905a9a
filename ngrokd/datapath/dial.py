# -*- test-case-name: ngrokd.test.test_dial -*-
"""
TCP client endpoints that look a name up only when they must.

L{HostnameEndpoint} resolves even an address, in a thread of the reactor's
pool, at every connection: under a burst of thousands that queue of lookups
is a cost of its own. An address is dialled directly, and the ingress's name
is looked up once and refreshed in the background (L{ResolvedName}).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from functools import lru_cache

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import (
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

#: Seconds an answer is used before it is looked up again, in the background.
REFRESH_AFTER = 60.0

Lookup = Callable[[str], Deferred[list[str]]]


def tcp_client_endpoint(
    reactor: IReactorTCP, host: str, port: int, timeout: float
) -> IStreamClientEndpoint:
    """
    Connect to C{host} (a name or an IPv4 or IPv6 address) and C{port},
    giving up after C{timeout} seconds.

    @param reactor: connects; to connect to a name it must also provide
        L{IReactorTime} (L{HostnameEndpoint} races the name's addresses).
    """
    direct = _address_endpoint(reactor, host, port, timeout)
    if direct is None:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    return direct


def _address_endpoint(
    reactor: IReactorTCP, host: str, port: int, timeout: float
) -> IStreamClientEndpoint | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    kind = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
    return kind(reactor, host, port, timeout=timeout)


@lru_cache(maxsize=1024)
def is_address(host: str) -> bool:
    """
    Whether C{host} is an IPv4 or IPv6 address, not a name (remembered for
    the last hosts asked about: they are asked about at every connection).
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ResolvedName:
    """
    Where to dial one host: an address at once, a name through its last
    looked-up addresses.

    Only the first dial of a name waits for a lookup. An answer older than
    C{refresh_after} seconds is looked up again in the background while
    dials go on using it; a lookup that fails keeps the answer it had. A dial
    that fails moves to the next address of the answer and asks for a fresh
    lookup.

    @param reactor: dials; it must also provide L{IReactorTime} and, unless
        C{lookup} is given, L{IReactorThreads} (names are looked up in a
        thread of its pool).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTCP,
        host: str,
        lookup: Lookup | None = None,
        refresh_after: float = REFRESH_AFTER,
    ) -> None:
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self.host = host
        self._lookup: Lookup = lookup or self._getaddrinfo
        self._refresh_after = refresh_after
        self.addresses: list[str] = []
        self._next = 0
        self._answered_at: float | None = None
        self._looking = False
        self._failing = False
        self._literal = is_address(host)

    def endpoint(self, port: int, timeout: float) -> IStreamClientEndpoint:
        """
        Dial C{port} of this host, giving up after C{timeout} seconds.
        """
        address = self.address()
        if address is None:
            return HostnameEndpoint(self._reactor, self.host, port, timeout=timeout)
        endpoint = _address_endpoint(self._reactor, address, port, timeout)
        assert endpoint is not None
        return endpoint

    def address(self) -> str | None:
        """
        The address to dial now (an IPv4 or IPv6 address, for
        L{IReactorTCP.connectTCP}); C{None} while the name's first lookup
        has not answered, when only an endpoint of its own can dial it.
        """
        if self._literal:
            return self.host
        now = self._clock.seconds()
        if self._answered_at is None or now - self._answered_at >= self._refresh_after:
            self._look_up()
        if not self.addresses:
            return None
        return self.addresses[self._next % len(self.addresses)]

    def failed(self) -> None:
        """
        A dial failed: use the next address, and look the name up again.
        """
        self._next += 1
        if self.addresses:
            self._look_up()

    def _look_up(self) -> None:
        if self._looking:
            return
        self._looking = True
        self._lookup(self.host).addCallbacks(self._answered, self._unanswered)

    def _answered(self, addresses: list[str]) -> None:
        self._looking = self._failing = False
        self._answered_at = self._clock.seconds()
        if addresses and addresses != self.addresses:
            self.addresses, self._next = addresses, 0

    def _unanswered(self, failure: Failure) -> None:
        self._looking = False
        self._answered_at = self._clock.seconds()  # asked again when stale
        if self._failing:
            return  # said when it began to fail
        self._failing = True
        self.log.info(
            "looking up {host} failed: {reason}; dials use {addresses}",
            host=self.host,
            reason=failure.getErrorMessage(),
            addresses=", ".join(self.addresses) or "a lookup of their own",
        )

    def _getaddrinfo(self, host: str) -> Deferred[list[str]]:
        def addresses() -> list[str]:
            answers = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            return list(dict.fromkeys(str(info[4][0]) for info in answers))

        threads = IReactorThreads(self._reactor)
        return deferToThreadPool(threads, threads.getThreadPool(), addresses)
