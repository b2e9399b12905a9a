# -*- test-case-name: ngrokd.test.test_web -*-
"""
The web page at C{/} of the health server: the daemon, its endpoints and a
live feed of events, for a person at this machine.

It is read-only and safe by default. The server answers only when the
C{Host} header passes L{host_allowed} (L{ngrokd.control.httpsite} applies
it to every path), so a web site whose name is made to resolve to this
machine (DNS rebinding) cannot read it. It sends no CORS headers, forbids
framing, and its Content Security Policy allows only its own script and
style files. It shows no secret (the API key is never on it), and only
C{GET} and C{HEAD} are answered.

The events arrive over server-sent events at C{/events}: at most
L{MAX_STREAMS} streams at once, each waiting a bounded time for the feed,
paused while the reader does not read, and ended after L{STREAM_LIFETIME}
seconds (the browser reconnects where it left off).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Collection
from importlib import resources
from typing import Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ngrokd.control.feed import Event, EventFeed, WatchedRows
from ngrokd.control.held import REQUESTS
from ngrokd.control.history import ConnectionHistory
from ngrokd.control.page import (
    EVENTS_SHOWN,
    IndexedRows,
    PageData,
    parse_query,
    render_page,
    select,
)
from ngrokd.status import DaemonStatus

#: Event streams open at once; more are refused with 503.
MAX_STREAMS = 8
#: Seconds a stream waits for an event before it sends a keep-alive.
STREAM_WAIT = 15.0
#: Seconds a stream lasts; shorter than the server's idle timeout.
STREAM_LIFETIME = 45.0
#: Events written at most at once.
STREAM_BATCH = 100

SECURITY_HEADERS = {
    b"Content-Security-Policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self';"
        b" img-src 'self'; connect-src 'self'; form-action 'self';"
        b" frame-ancestors 'none'; base-uri 'none'"
    ),
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cross-Origin-Resource-Policy": b"same-origin",
    b"Cross-Origin-Opener-Policy": b"same-origin",
    b"Cache-Control": b"no-store",
}

_STATIC = {
    b"page.css": b"text/css; charset=utf-8",
    b"page.js": b"text/javascript; charset=utf-8",
}


def host_allowed(host: bytes | None, names: Collection[str]) -> bool:
    """
    Whether a request's C{Host} header (port included or not) names this
    machine in a way no other web site can: an IP address, C{localhost},
    or one of C{names} (lowercase, no trailing dot).
    """
    if not host:
        return False
    text = host.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or not (rest == "" or rest[:1] == ":" and rest[1:].isdigit()):
            return False
        return _is_address(inside)
    name, colon, port = text.partition(":")
    if colon and not port.isdigit():
        return False
    name = name.rstrip(".")
    return _is_address(name) or name == "localhost" or name in names


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def plain_text(request: Request, code: int, text: str) -> bytes:
    """
    Answer C{code} with C{text} as plain UTF-8 text.
    """
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return text.encode("utf-8")


def _secure(request: Request) -> None:
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)


class ForeignHost(Resource):
    """
    What every path answers to a C{Host} that L{host_allowed} refuses: 403,
    saying which names are answered.
    """

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> bytes:
        _secure(request)
        return plain_text(
            request,
            403,
            "this server answers only to IP addresses, localhost and the"
            " names in server.web_hosts\n",
        )


class _Guarded(Resource):
    """
    A leaf that refuses methods other than C{GET} and C{HEAD}, and sends
    the security headers on every answer.
    """

    isLeaf = True
    allowedMethods = (b"GET", b"HEAD")
    #: The path its work on the reactor is timed as.
    name = ""

    def __init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> bytes | int:
        _secure(request)
        if request.method not in self.allowedMethods:
            request.setHeader(b"Allow", b", ".join(self.allowedMethods))
            return plain_text(request, 405, "only GET and HEAD are answered here\n")
        with REQUESTS.timing(f"GET {self.name}"):
            return self.page(request)

    def page(self, request: Request) -> bytes | int:
        raise NotImplementedError


class _Static(_Guarded):
    """
    The page's script and style sheet, read from the package once.
    """

    name = "/static"

    def __init__(self) -> None:
        super().__init__()
        self._files: dict[bytes, bytes] = {}

    def page(self, request: Request) -> bytes:
        path = request.postpath or []
        name = path[0] if len(path) == 1 else b""
        kind = _STATIC.get(name)
        if kind is None:
            return plain_text(request, 404, "no such file\n")
        if name not in self._files:
            file = resources.files(__package__) / "static" / name.decode()
            self._files[name] = file.read_bytes()
        request.setHeader(b"Content-Type", kind)
        return self._files[name]


class _Dashboard(_Guarded):
    """
    The page: rendered from the kept rows at each request, one page of
    them.
    """

    name = "/"

    def __init__(self, web: WebPage) -> None:
        super().__init__()
        self._web = web

    def page(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return render_page(self._web.page_data(request.args or {})).encode("utf-8")


class _Events(_Guarded):
    """
    C{/events}: the feed as server-sent events.
    """

    name = "/events"

    def __init__(self, web: WebPage) -> None:
        super().__init__()
        self._web = web

    def page(self, request: Request) -> bytes | int:
        web = self._web
        if len(web.streams) >= MAX_STREAMS:
            return plain_text(
                request,
                503,
                f"{MAX_STREAMS} event streams are open already; close a page\n",
            )
        request.setHeader(b"Content-Type", b"text/event-stream")
        if request.method == b"HEAD":
            return b""
        after = _after(request, web.feed.last_id)
        stream = EventStream(request, web.feed, web.clock, after)
        web.streams.add(stream)
        stream.done.addBoth(lambda _: web.streams.discard(stream))
        stream.start()
        return NOT_DONE_YET


def _after(request: Request, default: int) -> int:
    """
    The last event the reader saw: C{Last-Event-ID} when the browser
    reconnects, else C{?after=}, else C{default}.
    """
    args = request.args or {}
    given = request.getHeader(b"last-event-id") or (args.get(b"after") or [b""])[0]
    try:
        return max(0, int(given))
    except ValueError:
        return default


@implementer(IPushProducer)
class EventStream:
    """
    One reader's stream of events. C{done} fires when it ends, however.
    """

    def __init__(
        self, request: Request, feed: EventFeed, clock: IReactorTime, after: int
    ) -> None:
        self._request = request
        self._feed = feed
        self._clock = clock
        self._after = after
        self._paused = False
        self._ended = False
        self._waiting: Deferred[list[Event]] | None = None
        self._later: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self.done: Deferred[None] = Deferred()

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addBoth(self._gone)
        self._request.write(b"retry: 2000\n\n")
        self._deadline = self._clock.callLater(STREAM_LIFETIME, self.end)
        self._next()

    def _next(self) -> None:
        self._later = None
        if self._ended or self._paused:
            return
        started = self._clock.seconds()
        self._waiting = self._feed.wait(self._after, STREAM_WAIT)
        self._waiting.addCallbacks(self._got, self._cancelled, (started,))

    def _got(self, events: list[Event], started: float) -> None:
        self._waiting = None
        if self._ended:
            return
        if events:
            events = events[:STREAM_BATCH]
            self._request.write(b"".join(_message(event) for event in events))
            self._after = events[-1].id
            self._next()
            return
        if not self._feed.running:
            self.end()
            return
        self._request.write(b": waiting\n\n")
        # The feed answers at once when it has too many readers: wait here.
        left = STREAM_WAIT - (self._clock.seconds() - started)
        if left > 0:
            self._later = self._clock.callLater(left, self._next)
        else:
            self._next()

    def _cancelled(self, failure: Failure) -> None:
        failure.trap(CancelledError)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._waiting is None and self._later is None and not self._ended:
            self._next()

    def stopProducing(self) -> None:
        self._stop()

    def end(self) -> None:
        """
        Finish the response (the browser reconnects) and stop.
        """
        if self._ended:
            return
        self._stop()
        self._request.unregisterProducer()
        self._request.finish()

    def _gone(self, result: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._ended:
            return
        self._ended = True
        for call in (self._deadline, self._later):
            if call is not None and call.active():
                call.cancel()
        if self._waiting is not None:
            self._waiting.cancel()
        self.done.callback(None)


def _message(event: Event) -> bytes:
    data = json.dumps(
        {
            "id": event.id,
            "time": event.time,
            "kind": event.kind,
            "url": event.url,
            "message": event.message,
        }
    )
    return f"id: {event.id}\ndata: {data}\n\n".encode()


class KeptRows(IndexedRows, WatchedRows, Protocol):
    """
    The kept rows, as the page reads them.
    """


class WebPage:
    """
    What the page reads, and the event streams it has open.

    @ivar names: the host names allowed besides addresses and C{localhost}.
    """

    def __init__(
        self,
        daemon_status: Callable[[], DaemonStatus],
        rows: KeptRows,
        feed: EventFeed,
        upgrade_percentiles: Callable[[], tuple[float | None, float | None]],
        names: Collection[str],
        clock: IReactorTime,
    ) -> None:
        self._daemon_status = daemon_status
        self._rows = rows
        self.feed = feed
        self.history = ConnectionHistory(rows, clock)
        self._upgrade = upgrade_percentiles
        self.names = frozenset(names)
        self.clock = clock
        self.streams: set[EventStream] = set()

    def page_data(self, args: dict[bytes, list[bytes]]) -> PageData:
        """
        What one request for the page shows.
        """
        query = parse_query(args)
        chosen = select(self._rows, query)
        last = self.feed.last_id
        return PageData(
            status=self._daemon_status(),
            query=query,
            selection=chosen,
            total=len(self._rows),
            sparklines={row.id: self.history.accepted(row.id) for row in chosen.rows},
            interval=self.history.interval,
            events=self.feed.after(max(0, last - EVENTS_SHOWN)),
            last_event=last,
            upgrade=self._upgrade(),
        )

    def add_to(self, root: Resource) -> None:
        """
        Serve the page at C{/} of C{root}, with its files and events.
        """
        root.putChild(b"", _Dashboard(self))
        root.putChild(b"events", _Events(self))
        root.putChild(b"static", _Static())

    def start(self) -> None:
        """
        Start keeping the connection history.
        """
        self.history.startService()

    def stop(self) -> None:
        """
        End every open event stream, and stop the history.
        """
        for stream in list(self.streams):
            stream.end()
        self.history.stopService()
