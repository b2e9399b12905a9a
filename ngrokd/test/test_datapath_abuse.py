"""
The data path under abuse, end to end: the real L{Daemon} and the devcloud on
loopback, over real mutual TLS, each test named after the attack it survives.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ngrokd.config import load_config
from ngrokd.daemon import Daemon
from ngrokd.datapath.splice import DRAIN_TIMEOUT, PipeProtocol, splice
from ngrokd.devcloud.tap import RunningDevcloud, start_devcloud
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.test.helpers import (
    Echo,
    Recorder,
    Source,
    connect,
    free_ports,
    listen,
    wait_until,
)

ECHO = "tcp://echo.test:7000"
BULK = "tcp://bulk.test:9"
SINK = "tcp://sink.test:10"


class FlowEcho(Echo):
    """
    Echoes, and stops reading while its replies are not being read: a
    backend that holds no more than its socket buffers.
    """

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)


def open_fds() -> int:
    """
    How many file descriptors this process has open.
    """
    return len(os.listdir("/proc/self/fd"))


class Counter(Recorder):
    """
    Counts the bytes that arrive instead of keeping them.
    """

    count = 0

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)


class DataPathAbuseTests(TestCase):
    """
    ngrokd against the devcloud, attacked by its clients and its peers.
    """

    timeout = 90

    def setUp(self) -> None:
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("counting open files needs /proc")
        self.source = Source(1024**4)
        self.sink = Recorder(on_read_closed=lambda r: None)
        backends = [
            (ECHO, listen(Factory.forProtocol(FlowEcho), self)),
            (BULK, listen(Factory.forProtocol(lambda: self.source), self)),
            (SINK, listen(Factory.forProtocol(lambda: self.sink), self)),
        ]
        self.devcloud: RunningDevcloud = start_devcloud(
            reactor,
            os.path.abspath(self.mktemp()),
            [(url, ("127.0.0.1", port)) for url, port in backends],
            start_port=free_ports(16),
        )
        self.addCleanup(self.devcloud.stop)

    async def start_daemon(self, **server: Any) -> Daemon:
        """
        Start a daemon with the devcloud's config (server settings changed
        by C{server}) and wait until every endpoint listens.
        """
        config = load_config(self.devcloud.config_path).config
        config = attrs.evolve(config, server=attrs.evolve(config.server, **server))
        daemon = Daemon(config, reactor)
        daemon.startService()
        self.addCleanup(daemon.stopService)
        await wait_until(
            lambda: sum(x.listening for x in daemon.listeners.listeners.values()) == 3,
            "3 listeners",
        )
        return daemon

    def port_of(self, daemon: Daemon, url: str) -> int:
        return daemon.listeners.listeners[parse_endpoint_url(url).url].spec.port

    def open_connections(self, daemon: Daemon) -> int:
        """
        Connections the daemon carries, and the devcloud's ingress holds.
        """
        local = sum(
            len(x.factory.connections) for x in daemon.listeners.listeners.values()
        )
        return local + len(self.devcloud.ingress.active)

    async def transferring(self, daemon: Daemon, url: str) -> Counter:
        """
        A client of C{url} that has received some of the backend's stream.
        """
        client = Counter()
        await connect(self.port_of(daemon, url), client)
        await wait_until(lambda: client.count > 1024 * 1024, "the first MiB")
        return client

    def test_resetWhileBackedUpLeavesNoUpstream(self) -> Deferred[None]:
        """
        Clients that fill every buffer both ways, never read, then reset
        leave no connection to the ingress behind, and the process's open
        files return to what they were before.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            baseline = open_fds()
            clients = [
                socket.create_connection(("127.0.0.1", self.port_of(daemon, ECHO)))
                for _ in range(3)
            ]
            try:
                for client in clients:
                    client.setblocking(False)
                await _fill(clients)
                self.assertEqual(len(self.devcloud.ingress.active), 3)
            finally:
                for client in clients:
                    client.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    client.close()
            await wait_until(
                lambda: self.open_connections(daemon) == 0, "no connections left"
            )
            await wait_until(lambda: open_fds() <= baseline, "open files at baseline")

        return ensureDeferred(run())

    def test_ingressKilledMidTransferResetsClient(self) -> Deferred[None]:
        """
        When the ingress goes away mid-transfer without ending TLS (a FIN
        without C{close_notify}, as when its process is killed), the client
        gets a reset, not a clean end that would pass the truncated stream
        off as complete.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            client = await self.transferring(daemon, BULK)
            (ingress,) = self.devcloud.ingress.active
            ingress.transport.transport.loseConnection()  # TCP, under TLS
            await wait_until(lambda: client.reason is not None, "the client's end")
            self.assertIsNone(client.reason.check(ConnectionDone))  # type: ignore[union-attr]
            self.assertFalse(client.read_closed)

        return ensureDeferred(run())

    def test_backendResetMidTransferResetsClient(self) -> Deferred[None]:
        """
        A backend that resets mid-transfer makes the devcloud's ingress reset
        its client, and the daemon reset its own: the local client sees the
        stream end in error.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            client = await self.transferring(daemon, BULK)
            self.source.transport.abortConnection()
            await wait_until(lambda: client.reason is not None, "the client's end")
            self.assertIsNone(client.reason.check(ConnectionDone))  # type: ignore[union-attr]
            self.assertFalse(client.read_closed)

        return ensureDeferred(run())

    def test_clientResetMidUploadResetsBackend(self) -> Deferred[None]:
        """
        A client that resets mid-upload makes the daemon reset the ingress
        connection and the devcloud reset the backend's: the backend does
        not take the partial upload for a complete one.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            client = Source(1024**4)
            await connect(self.port_of(daemon, SINK), client)
            await wait_until(lambda: len(self.sink.received) > 1024 * 1024, "a MiB")
            client.transport.abortConnection()
            sink = self.sink
            await wait_until(lambda: sink.reason is not None, "the backend's end")
            self.assertIsNone(sink.reason.check(ConnectionDone))  # type: ignore[union-attr]
            self.assertFalse(sink.read_closed)

        return ensureDeferred(run())


class StalledReaderTests(SynchronousTestCase):
    """
    A pipe whose reader stops reading for good, on memory transports.
    """

    def test_closeThatCannotDrainIsAborted(self) -> None:
        """
        When both directions have ended but one side's reader never takes
        what is left for it, that side is aborted after L{DRAIN_TIMEOUT}
        instead of being held open forever.
        """
        clock = Clock()
        a, b = PipeProtocol(), PipeProtocol()
        for end in (a, b):
            end.makeConnection(AbortableTransport())
        splice(a, b, clock)
        b.dataReceived(b"the rest of the reply")
        a.readConnectionLost()
        b.readConnectionLost()
        self.assertTrue(a.transport.disconnecting)
        clock.advance(DRAIN_TIMEOUT - 1)
        self.assertFalse(a.transport.aborted)
        clock.advance(1)
        self.assertTrue(a.transport.aborted)
        self.assertTrue(b.transport.aborted)


class AbortableTransport(StringTransport):
    """
    A memory transport that never finishes a graceful close by itself and
    records an abort; like TCP's, it takes an unregister without a producer.
    """

    aborted = False

    def unregisterProducer(self) -> None:
        self.producer = None

    def loseWriteConnection(self) -> None:
        pass

    def abortConnection(self) -> None:
        self.aborted = True


async def _fill(clients: list[socket.socket]) -> None:
    """
    Send on every client until nothing more is taken for a second.
    """
    chunk = b"x" * 65536
    idle_rounds = 0
    for _ in range(5000):
        progress = False
        for client in clients:
            try:
                while client.send(chunk):
                    progress = True
            except BlockingIOError:
                pass
        idle_rounds = 0 if progress else idle_rounds + 1
        if idle_rounds == 20:
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("the clients never stopped sending")
