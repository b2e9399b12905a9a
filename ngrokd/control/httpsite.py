# -*- test-case-name: ngrokd.test.test_health -*-
"""
The health server's HTTP site, bounded against the clients a browser page
or a remote peer can make.

Every request's C{Host} is checked before its path is looked at: a name
that is not an IP address, C{localhost} or one of C{server.web_hosts} gets
403 on every path, so a page whose name is made to resolve to this machine
(DNS rebinding) reads nothing. Each request must arrive whole, head and
body, within L{REQUEST_DEADLINE} seconds of its first byte (of the
connection's opening, for the first), however slowly it trickles in.
Connections are capped per peer address and in all; one past a cap is
closed as it is accepted, counted in C{/metrics}, and logged at most once
a minute. Bodies are dropped unread, and no access log is written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator
from io import BytesIO
from typing import cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from ngrokd.control.web import ForeignHost, host_allowed

#: Seconds a request may take to arrive, head and body, from its first
#: byte: long enough for any client on a loaded machine, short enough that
#: a client cannot hold a connection by trickling header lines.
REQUEST_DEADLINE = 10.0
#: Connections open at once from one peer address (a browser opens six,
#: plus its event streams).
MAX_PER_PEER = 16
#: Connections open at once in all.
MAX_CONNECTIONS = 64
#: Seconds between two log lines about refused connections.
REFUSED_LOG_INTERVAL = 60.0

_LATE = f"the request did not arrive within {REQUEST_DEADLINE:g} s\n".encode()
#: What a request that came too late is answered.
REQUEST_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_LATE), _LATE)
)

#: What each limit means, for the log.
LIMITS = {
    "peer": f"{MAX_PER_PEER} connections from this address are open already",
    "total": f"{MAX_CONNECTIONS} connections are open already",
}


def refusal(from_peer: int, total: int) -> str:
    """
    The limit that refuses one more connection when C{from_peer}
    connections from its address and C{total} in all are open (C{peer} or
    C{total}); C{""} when it is accepted.
    """
    if from_peer >= MAX_PER_PEER:
        return "peer"
    if total >= MAX_CONNECTIONS:
        return "total"
    return ""


class _BodylessRequest(Request):
    """
    A request whose body is dropped as it arrives: no page reads one, and
    an unread body must not fill memory or a temporary file.
    """

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        pass


class _Channel(HTTPChannel):
    """
    An HTTP/1.1 connection whose every request must arrive within
    L{REQUEST_DEADLINE} seconds of its first byte; it tells its site when
    it closes.
    """

    site: HealthSite
    peer = ""
    _arriving = True
    _deadline: IDelayedCall | None = None
    _abort: IDelayedCall | None = None

    def connectionMade(self) -> None:
        HTTPChannel.connectionMade(self)
        self._start_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self._arriving and self._deadline is None:
            self._start_deadline()
        HTTPChannel.dataReceived(self, data)

    def allContentReceived(self) -> None:
        self._arriving = False
        self._cancel_deadline()
        HTTPChannel.allContentReceived(self)

    def requestDone(self, request: Request) -> None:
        # The next request's bytes, if any came already, are read in here.
        self._arriving = True
        HTTPChannel.requestDone(self, request)

    def _start_deadline(self) -> None:
        self._deadline = self.site.reactor.callLater(REQUEST_DEADLINE, self._late)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _late(self) -> None:
        self._deadline = None
        self.site.timed_out += 1
        transport = cast(ITCPTransport, self.transport)
        transport.write(REQUEST_TIMEOUT_ANSWER)
        transport.loseConnection()
        # A peer that reads nothing would keep the answer unsent.
        self._abort = self.site.reactor.callLater(
            REQUEST_DEADLINE, transport.abortConnection
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self.site.closed(self.peer)
        HTTPChannel.connectionLost(self, reason)


class HealthSite(Site):
    """
    The health server's site: C{root}, guarded by the C{Host} rule, the
    request deadline and the connection caps, on C{clock}'s time.

    @ivar open: connections open now, by peer address.
    @ivar refused: connections refused at accept, by the limit reached
        (C{peer} or C{total}).
    @ivar timed_out: requests that did not arrive in time.
    """

    logger = Logger()
    noisy = False
    protocol = _Channel  # type: ignore[assignment]
    requestFactory = _BodylessRequest

    def __init__(
        self,
        root: Resource,
        names: Collection[str],
        clock: IReactorTime,
        idle_timeout: float,
    ) -> None:
        Site.__init__(self, root, timeout=idle_timeout, reactor=clock)
        self._names = names
        self._foreign = ForeignHost()
        self.open: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.timed_out = 0
        self._unlogged = 0
        self._logged_at: float | None = None

    def buildProtocol(self, addr: IAddress | None) -> _Channel | None:  # type: ignore[override]
        peer = str(getattr(addr, "host", ""))
        limit = refusal(self.open[peer], self.open.total())
        if limit:
            self._refuse(peer, limit)
            return None
        channel: _Channel = Site.buildProtocol(self, addr)
        channel.peer = peer
        self.open[peer] += 1
        return channel

    def closed(self, peer: str) -> None:
        """
        A connection from C{peer} has closed.
        """
        self.open[peer] -= 1
        if self.open[peer] <= 0:
            del self.open[peer]

    def _refuse(self, peer: str, limit: str) -> None:
        self.refused[limit] += 1
        self._unlogged += 1
        now = self.reactor.seconds()
        if self._logged_at is not None and now - self._logged_at < REFUSED_LOG_INTERVAL:
            return
        self.logger.warn(
            "the health server refused a connection from {peer}: {why}"
            " ({count} refused since the last such message)",
            peer=peer,
            why=LIMITS[limit],
            count=self._unlogged,
        )
        self._logged_at, self._unlogged = now, 0

    def getResourceFor(self, request: Request) -> IResource:
        if not host_allowed(request.getHeader(b"host"), self._names):
            return self._foreign
        resource: IResource = Site.getResourceFor(self, request)
        return resource

    def log(self, request: object) -> None:
        """
        No access log: probes every few seconds would drown the daemon's
        own messages.
        """

    def collect(self) -> Iterator[Metric]:
        """
        The site's counts, for C{/metrics}.
        """
        opened = GaugeMetricFamily(
            "ngrokd_http_connections_open",
            "Connections open to the health server.",
        )
        opened.add_metric([], self.open.total())
        refused = CounterMetricFamily(
            "ngrokd_http_connections_refused",
            "Connections to the health server closed at accept, by the limit"
            " reached: peer (per address) or total.",
            labels=["limit"],
        )
        for limit in ("peer", "total"):
            refused.add_metric([limit], self.refused[limit])
        late = CounterMetricFamily(
            "ngrokd_http_requests_timed_out",
            "Requests to the health server that did not arrive in time.",
        )
        late.add_metric([], self.timed_out)
        yield from (opened, refused, late)
