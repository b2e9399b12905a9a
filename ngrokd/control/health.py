# -*- test-case-name: ngrokd.test.test_health -*-
"""
The health and metrics HTTP server, for probes, monitors and Prometheus.

C{/healthz} answers 200 while the process and its reactor run, with or
without endpoints: an idle daemon is alive, and a failed endpoint is shown
in C{/status}, not reported as a dead process. C{/readyz} answers 200 while
the daemon serves what it should (L{DaemonStatus.not_ready_because}), 503
with the reason otherwise. C{/status} is the whole picture
as JSON: the original's fields, then ours. C{/metrics} is the Prometheus
exposition of L{ngrokd.control.metrics}. C{/health} and C{/ready} are the
original's names for the first two. C{/} is the web page of
L{ngrokd.control.web}.

Only C{GET} and C{HEAD} are answered, and only to the C{Host} names of
L{ngrokd.control.httpsite}; request bodies are dropped unread, slow
requests and idle connections closed, and connections capped, so a client
cannot make the server hold memory or descriptors. A port that cannot be
bound is logged with what to do; the daemon carries on.
"""

from __future__ import annotations

import datetime
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import attrs
from attrs import frozen
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorCore,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ngrokd.control.held import REQUESTS
from ngrokd.control.httpsite import HealthSite
from ngrokd.control.slices import SlicedBody, batched, slicer
from ngrokd.control.web import WebPage, plain_text
from ngrokd.endpoints import join_host_port
from ngrokd.status import FAILED, LISTENING, DaemonStatus, EndpointStatus

#: Seconds an idle HTTP connection is kept.
IDLE_TIMEOUT = 60
#: Endpoints of C{/status} written in one piece.
ROWS_AT_ONCE = 250


class KeptRows(Protocol):
    """
    The kept status rows (L{ngrokd.board.StatusBoard}), as C{/status}
    reads them.
    """

    def keys(self, state: str = "") -> Sequence[tuple[str, str]]: ...
    def rows_of(self, ids: Iterable[str]) -> list[EndpointStatus]: ...
    def count(self, state: str) -> int: ...


class StatusSource(Protocol):
    """
    What the server reads: the daemon's status values.
    """

    @property
    def board(self) -> KeptRows: ...
    def daemon_status(self) -> DaemonStatus: ...
    def endpoint_status(self) -> tuple[EndpointStatus, ...]: ...


def split_address(address: str) -> tuple[str, int]:
    """
    C{("::1", 8081)} for C{"[::1]:8081"}: the host (no brackets) and port of
    a C{server.health_address}.
    """
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def healthy(status: DaemonStatus, endpoints: Sequence[EndpointStatus]) -> bool:
    """
    Ready, and serving every endpoint it was given (the original's
    C{healthy} meant every endpoint active).
    """
    return status.ready and all(row.state != FAILED for row in endpoints)


def readiness_text(status: DaemonStatus, endpoints: Sequence[EndpointStatus]) -> str:
    """
    What C{/readyz} says: C{ready}, or why the daemon is not; then every
    failed endpoint and why, one a line, and why the names are in the hosts
    file instead of DNS, when they are. A ready daemon's failed endpoints
    are those no change on this machine would serve (an unreadable URL, two
    endpoints on one socket).
    """
    reason = status.not_ready_because
    failed = [
        f"{row.url or row.id}: {row.reason}\n"
        for row in endpoints
        if row.state == FAILED
    ]
    fallback = status.names_fallback
    names = (
        f"names are in the hosts file: {fallback}\n"
        if fallback and fallback not in reason
        else ""
    )
    if not reason:
        return "ready\n" + "".join(f"not served: {line}" for line in failed) + names
    return f"not ready: {reason}\n" + "".join(failed) + names


def status_document(
    status: DaemonStatus, endpoints: Sequence[EndpointStatus]
) -> dict[str, Any]:
    """
    The C{/status} JSON: the original's keys (C{healthy}, C{ready},
    C{uptime} as a Go duration, C{start_time}, and C{endpoints} by id with
    C{name}, C{local_address}, C{target_uri}, C{active}, C{connections},
    C{total_connections}, C{last_activity} (not tracked: C{null}) and
    C{errors}), then ours beside them.
    """
    return {
        "healthy": healthy(status, endpoints),
        "ready": status.ready,
        "not_ready_because": status.not_ready_because,
        "uptime": go_duration(status.uptime),
        "uptime_seconds": status.uptime,
        "start_time": rfc3339(status.started),
        "version": status.version,
        "identity": {
            "state": status.identity_state,
            "operator_id": status.operator_id,
            "certificate_expires": rfc3339(status.certificate_expires),
            "error": status.identity_error,
        },
        "ingress_endpoint": status.ingress_endpoint,
        "warm_connections": status.warm_connections,
        "discovery": {
            "polled": status.polled,
            "last_poll": rfc3339(status.last_poll),
            "error": status.poll_error,
            "failures": status.poll_failures,
        },
        "listeners": {
            "planned": status.listeners_planned,
            "up": status.listeners_up,
            "unplanned": status.listeners_unplanned,
        },
        "names_error": status.names_error,
        "names": {
            "via": status.names_via,
            "fallback": status.names_fallback,
            "strict": status.names_strict,
        },
        "ipv6": {"subnet": status.ipv6_subnet, "error": status.ipv6_error},
        "problems": [
            {
                "what": problem.what,
                "error": problem.error,
                "since": rfc3339(problem.since),
                "count": problem.count,
            }
            for problem in status.problems
        ],
        "endpoints": {row.id: _endpoint_document(row) for row in endpoints},
    }


def status_json(daemon: StatusSource) -> bytes:
    """
    L{status_document} of C{daemon} now, as one line of JSON (compact, as
    the original's: the encoder written in C does not indent).
    """
    return b"".join(StatusPieces().pieces(daemon))


class StatusPieces:
    """
    The C{/status} JSON in pieces, byte for byte L{status_document} as
    C{json.dumps} writes it, from the kept rows: the daemon's part, then
    the endpoints of that moment, L{ROWS_AT_ONCE} at a time, each row as it
    is when its piece is made. Each row's text is kept while the row is the
    same, so that only the rows that changed are written again.
    """

    def __init__(self) -> None:
        self._texts: dict[str, tuple[EndpointStatus, bytes]] = {}

    def pieces(self, daemon: StatusSource) -> Iterator[bytes]:
        status = daemon.daemon_status()
        board = daemon.board
        ids = [id for _, id in board.keys()]
        document = status_document(status, ())
        document["healthy"] = status.ready and board.count(FAILED) == 0
        head = json.dumps(document)
        # The endpoints come last: write up to their opening brace.
        yield head[: -len("}}")].encode("utf-8")
        if len(self._texts) > 2 * len(ids):
            self._texts = {}
        texts, separator = self._texts, b""
        for batch in batched(ids, ROWS_AT_ONCE):
            parts = []
            for row in board.rows_of(batch):  # those not gone since
                kept = texts.get(row.id)
                if kept is None or kept[0] is not row:
                    text = json.dumps({row.id: _endpoint_document(row)})[1:-1]
                    kept = texts[row.id] = (row, text.encode("utf-8"))
                parts.append(kept[1])
            if parts:
                yield separator + b", ".join(parts)
                separator = b", "
        yield b"}}\n"


def _endpoint_document(row: EndpointStatus) -> dict[str, Any]:
    original = {
        "name": row.id,
        "local_address": row.listen_address,
        "target_uri": row.url,
        "active": row.state == LISTENING,
        "connections": row.connections_open,
        "total_connections": row.connections_total,
        "last_activity": None,
        "errors": row.errors,
    }
    return original | attrs.asdict(row, recurse=False)


def rfc3339(seconds: float | None) -> str | None:
    """
    C{2025-01-02T03:04:05.5Z} for seconds since the epoch; C{None} stays.
    """
    if seconds is None:
        return None
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return when.isoformat().replace("+00:00", "Z")


def go_duration(seconds: float) -> str:
    """
    A duration as Go's C{time.Duration.String} writes it (C{1h2m3.5s},
    C{1m0s}, C{250ms}), as the original's C{uptime} was.
    """
    ns = max(0, round(seconds * 1e9))
    if ns == 0:
        return "0s"
    if ns < 10**9:
        for unit, scale in (("ms", 10**6), ("µs", 10**3), ("ns", 1)):
            if ns >= scale:
                return _decimal(ns, scale) + unit
    hours, ns = divmod(ns, 3600 * 10**9)
    minutes, ns = divmod(ns, 60 * 10**9)
    text = f"{hours}h" if hours else ""
    if hours or minutes:
        text += f"{minutes}m"
    return text + _decimal(ns, 10**9) + "s"


def _decimal(value: int, scale: int) -> str:
    whole, fraction = divmod(value, scale)
    if not fraction:
        return str(whole)
    digits = len(str(scale)) - 1
    return f"{whole}.{fraction:0{digits}d}".rstrip("0")


class _Page(Resource):
    """
    A leaf that answers C{GET} and C{HEAD} only (any other method gets 405
    and C{Allow}), with no caching; its work on the reactor is timed as
    C{name}'s.
    """

    isLeaf = True
    allowedMethods = (b"GET", b"HEAD")
    name = ""

    def __init__(self, daemon: StatusSource) -> None:
        Resource.__init__(self)
        self._daemon = daemon

    def render(self, request: Request) -> bytes | int:
        if request.method not in self.allowedMethods:
            request.setHeader(b"Allow", b", ".join(self.allowedMethods))
            return plain_text(request, 405, "only GET and HEAD are answered here\n")
        request.setHeader(b"Cache-Control", b"no-store")
        with REQUESTS.timing(f"GET {self.name}"):
            return self.page(request)

    def page(self, request: Request) -> bytes | int:
        raise NotImplementedError


class _Alive(_Page):
    name = "/healthz"

    def page(self, request: Request) -> bytes:
        return plain_text(request, 200, "healthy\n")


class _Ready(_Page):
    name = "/readyz"

    def page(self, request: Request) -> bytes:
        status = self._daemon.daemon_status()
        text = readiness_text(status, self._daemon.endpoint_status())
        return plain_text(request, 200 if status.ready else 503, text)


class _Status(_Page):
    """
    C{/status}, written in slices (L{ngrokd.control.slices}).
    """

    name = "/status"

    def __init__(self, daemon: StatusSource, slices: Cooperator) -> None:
        super().__init__(daemon)
        self._slices = slices
        self._pieces = StatusPieces()

    def page(self, request: Request) -> bytes | int:
        request.setHeader(b"Content-Type", b"application/json")
        if request.method == b"HEAD":
            return b""
        SlicedBody(
            request, self._pieces.pieces(self._daemon), self._slices, "GET /status"
        )
        return NOT_DONE_YET


class _Metrics(_Page):
    """
    C{/metrics}: the registry, then the per-endpoint series in slices.
    """

    name = "/metrics"
    log = Logger()

    def __init__(
        self,
        daemon: StatusSource,
        registry: CollectorRegistry,
        scraped: Scraped,
        slices: Cooperator,
    ) -> None:
        super().__init__(daemon)
        self._registry = registry
        self._scraped = scraped
        self._slices = slices

    def page(self, request: Request) -> bytes | int:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        if request.method == b"HEAD":
            return b""
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        ready = self._scraped.before()
        ready.addCallback(lambda _: None if gone else self._answer(request))
        ready.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _answer(self, request: Request) -> None:
        with REQUESTS.timing("GET /metrics"):
            head = generate_latest(self._registry)
        pieces = itertools.chain([head], self._scraped.per_endpoint())
        SlicedBody(request, pieces, self._slices, "GET /metrics")

    def _failed(self, failure: Failure, request: Request) -> None:
        self.log.failure("answering GET /metrics failed", failure)
        request.setResponseCode(500)
        request.finish()


@frozen
class Scraped:
    """
    What C{/metrics} adds to its registry: C{before} each scrape (a
    L{Deferred}: the work may be done in a thread), and the pieces of text
    of C{per_endpoint} after the registry's.
    """

    before: Callable[[], Deferred[None]] = lambda: succeed(None)
    per_endpoint: Callable[[], Iterable[bytes]] = tuple


def health_site(
    daemon: StatusSource,
    registry: CollectorRegistry,
    web: WebPage,
    clock: IReactorTime,
    scraped: Scraped = Scraped(),
) -> HealthSite:
    """
    The pages, on a site with C{clock}'s time, with the web page at C{/};
    the site's own counts join C{registry}, and C{/metrics} adds
    C{scraped}.
    """
    root = Resource()
    alive, ready = _Alive(daemon), _Ready(daemon)
    slices = slicer(clock)
    for name, page in [
        (b"healthz", alive),
        (b"health", alive),
        (b"readyz", ready),
        (b"ready", ready),
        (b"status", _Status(daemon, slices)),
        (b"metrics", _Metrics(daemon, registry, scraped, slices)),
    ]:
        root.putChild(name, page)
    web.add_to(root)
    site = HealthSite(root, web.names, clock, IDLE_TIMEOUT)
    registry.register(site)
    return site


class HealthService(Service):
    """
    Serves L{health_site} on C{address} while running, and keeps the web
    page's history. C{site} is what it serves, C{port} the listening port
    once bound; C{error} says why binding failed.

    @param reactor: listens over TCP (L{IReactorTCP}); it must provide
        L{IReactorTime} too.
    """

    log = Logger()
    name = "health"

    def __init__(
        self,
        address: str,
        daemon: StatusSource,
        registry: CollectorRegistry,
        reactor: IReactorCore,
        web: WebPage,
        scraped: Scraped = Scraped(),
    ) -> None:
        self.address = address
        self._reactor = reactor
        self.web = web
        self.site = health_site(daemon, registry, web, IReactorTime(reactor), scraped)
        self.port: IListeningPort | None = None
        self.error = ""
        self._listening: Deferred[None] | None = None

    def startService(self) -> None:
        Service.startService(self)
        host, port = split_address(self.address)
        kind = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
        endpoint: IStreamServerEndpoint = kind(self._reactor, port, interface=host)
        self.web.start()
        listening: Deferred[Any] = endpoint.listen(self.site)
        self._listening = listening.addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> None:
        self._listening = None
        self.port, self.error = port, ""
        bound = port.getHost()
        self.log.info(
            "health and metrics on http://{address}/",
            address=join_host_port(bound.host, bound.port),  # type: ignore[attr-defined]
        )

    def _failed(self, failure: Failure) -> None:
        self._listening = None
        error = failure.value
        if isinstance(error, CannotListenError) and isinstance(
            error.socketError, OSError
        ):
            self.error = error.socketError.strerror or str(error.socketError)
        else:
            self.error = failure.getErrorMessage()
        self.log.error(
            "cannot serve health and metrics on {address}: {error}; the daemon"
            " runs without them. Set server.health_address to a free address"
            ' and port, or to "" to turn them off',
            address=self.address,
            error=self.error,
        )

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        if self._listening is not None:
            self._listening.cancel()
        self.web.stop()
        port, self.port = self.port, None
        if port is None:
            return None
        stopping: Deferred[None] = maybeDeferred(port.stopListening)  # type: ignore[call-overload]
        return stopping
