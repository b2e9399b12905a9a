"""
Keep-alive HTTP while the daemon stops, end to end: the real L{Daemon} and
the devcloud on loopback over real mutual TLS, a real HTTP server behind the
devcloud, and a real keep-alive client (C{http.client} reading each response
from one socket) sending a request every 0.3 s. The grace is timed by a
L{Clock} that only the test advances, so it never ends on its own.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ngrokd.config import load_config
from ngrokd.daemon import Daemon
from ngrokd.datapath.bridge import BridgeFactory
from ngrokd.devcloud.tap import start_devcloud
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.test.helpers import devcloud_ingress, free_ports, listen, wait_until

WEB = "http://web.test"
GRACE = 30.0
#: Seconds between the client's requests.
INTERVAL = 0.3
#: Chunks of the slow answer, sent once the test lets it go.
CHUNKS = [b"first chunk\n", b"second chunk\n", b"last chunk\n"]

Event = tuple[Any, ...]


class Numbered(Resource):
    """
    C{/n/N} answers C{answer N}, with a Content-Length.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"answer " + request.path.rsplit(b"/", 1)[-1]


class Slow(Resource):
    """
    C{/slow} answers only when the test calls L{answer}, in chunks.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        self.waiting.append(request)
        return NOT_DONE_YET

    def answer(self) -> None:
        for request in self.waiting:
            for chunk in CHUNKS:
                request.write(chunk)
            request.finish()
        self.waiting = []


def keep_alive_client(
    port: int, paths: list[bytes], events: list[Event], stop: threading.Event
) -> None:
    """
    Request each of C{paths} on one connection to 127.0.0.1:C{port}, one
    every L{INTERVAL} seconds, and record each response (path, status, body,
    C{Connection} header) and then how the connection ended: C{closed} when
    the server closed it cleanly between responses (after saying so, or
    before a response began), C{failed} with the error otherwise (a reset,
    a truncated response), C{stopped} when C{stop} was set first, C{done}
    when every path was answered.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        for path in paths:
            if stop.is_set():
                events.append(("stopped",))
                return
            try:
                sock.sendall(b"GET %s HTTP/1.1\r\nHost: web.test\r\n\r\n" % path)
                response = http.client.HTTPResponse(sock, method="GET")
                response.begin()
                body = response.read()
            except http.client.RemoteDisconnected:
                events.append(("closed",))
                return
            except (OSError, http.client.HTTPException) as e:
                events.append(("failed", repr(e)))
                return
            connection = response.getheader("Connection")
            events.append(("response", path, response.status, body, connection))
            if response.will_close:
                try:
                    rest = sock.recv(1)
                except OSError as e:
                    events.append(("failed", repr(e)))
                else:
                    events.append(("closed",) if not rest else ("failed", rest))
                return
            stop.wait(INTERVAL)
    events.append(("done",))


class GraceKeepAliveTests(TestCase):
    """
    A keep-alive HTTP connection ends at a response boundary when the daemon
    stops, instead of being reset when the grace ends.
    """

    timeout = 60

    def setUp(self) -> None:
        root = Resource()
        numbered = Numbered()
        self.slow = Slow()
        root.putChild(b"n", numbered)
        root.putChild(b"slow", self.slow)
        self.backend = listen(Site(root), self)
        self.clock = Clock()
        self.events: list[Event] = []
        self.stop = threading.Event()
        self.addCleanup(self.stop.set)

    def client(self, port: int, paths: list[bytes]) -> Deferred[None]:
        """
        Run L{keep_alive_client} in a thread, recording in C{self.events}.
        """
        return deferToThread(keep_alive_client, port, paths, self.events, self.stop)

    async def start_daemon(self) -> int:
        """
        Start a devcloud and a daemon with its config and a grace of
        L{GRACE} seconds timed by C{self.clock}; the port it serves L{WEB}
        on.
        """
        devcloud = start_devcloud(
            reactor,
            os.path.abspath(self.mktemp()),
            [(WEB, ("127.0.0.1", self.backend))],
            start_port=free_ports(4),
        )
        self.addCleanup(devcloud.stop)
        config = load_config(devcloud.config_path).config
        config = attrs.evolve(
            config, server=attrs.evolve(config.server, shutdown_grace=GRACE)
        )
        self.daemon = Daemon(config, reactor, clock=self.clock)
        self.daemon.startService()
        self.addCleanup(self.daemon.stopService)
        listeners = self.daemon.listeners.listeners
        await wait_until(
            lambda: any(x.listening for x in listeners.values()), "a listener"
        )
        (listener,) = listeners.values()
        return listener.spec.port

    def assertAnswered(self, events: list[Event]) -> None:
        """
        Every response in C{events} is complete and the connection then
        ended cleanly, between responses.
        """
        *responses, end = events
        self.assertEqual(end, ("closed",), events)
        for _, path, status, body, _ in responses:
            expected = b"".join(CHUNKS) if path == b"/slow" else b"answer " + path[3:]
            self.assertEqual((status, body), (200, expected))

    async def test_idleConnectionClosedAtOnce(self) -> None:
        """
        A client sending a request every 0.3 s on one keep-alive connection
        has its connection closed cleanly between two responses as soon as
        the daemon stops, not reset when the grace ends; every response it
        got is complete.
        """
        port = await self.start_daemon()
        client = self.client(port, [b"/n/%d" % n for n in range(100)])
        await wait_until(lambda: len(self.events) >= 3, "the first answers")
        stopping = self.daemon.stopService()
        await self.end_grace(client, 6, None)
        await stopping
        self.assertAnswered(self.events)

    async def test_requestInFlightAnsweredWithClose(self) -> None:
        """
        A request in flight when the daemon stops gets its whole answer (a
        chunked one here), saying C{Connection: close}; then the connection
        closes cleanly.
        """
        port = await self.start_daemon()
        paths = [b"/n/0", b"/n/1", b"/slow", *[b"/n/%d" % n for n in range(3, 100)]]
        client = self.client(port, paths)
        await wait_until(lambda: bool(self.slow.waiting), "the slow request")
        stopping = self.daemon.stopService()
        await wait_until(lambda: not self.daemon.listeners.listeners, "no listeners")
        self.slow.answer()
        await self.end_grace(client, 6, None)
        await stopping
        self.assertAnswered(self.events)
        self.assertEqual(self.events[2][1::3], (b"/slow", "close"))

    async def test_virtualMode(self) -> None:
        """
        Where requests pass untouched (virtual mode: no Host to rewrite), the
        connection ends between two responses all the same.
        """
        harness = devcloud_ingress(self)
        harness.cloud.add_endpoint(WEB, ("127.0.0.1", self.backend))
        factory = BridgeFactory(parse_endpoint_url(WEB), harness.connector, None)
        client = self.client(listen(factory, self), [b"/n/%d" % n for n in range(100)])
        await wait_until(lambda: len(self.events) >= 3, "the first answers")
        factory.drain()
        await self.end_grace(client, 6, factory)
        self.assertAnswered(self.events)

    async def end_grace(
        self, client: Deferred[None], answers: int, factory: BridgeFactory | None
    ) -> None:
        """
        Wait until the client ends or has had C{answers} answers in all,
        then end the grace as the daemon does (C{factory}'s connections
        still open are reset) and wait for the client's end.
        """
        await wait_until(
            lambda: client.called or len(self.events) >= answers,
            "the client's end or more answers",
        )
        if factory is None:
            self.clock.advance(GRACE)
        else:
            for connection in list(factory.connections):
                connection.abort()
        await client
