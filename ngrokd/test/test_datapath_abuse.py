"""
The data path under abuse, end to end: the real L{Daemon} and the devcloud on
loopback, over real mutual TLS, each test named after the attack it survives.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

import attrs
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import (
    ConnectionDone,
    ConnectionRefusedError,
    ReactorNotRunning,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ngrokd.config import load_config
from ngrokd.daemon import Daemon
from ngrokd.datapath.bridge import KEEPALIVE_IDLE
from ngrokd.datapath.descriptors import (
    ACCEPT_BACKOFF,
    ACCEPTING_AGAIN_AFTER,
    SPARE,
    AcceptGuard,
    DescriptorReserve,
    GuardedSocket,
)
from ngrokd.datapath.listeners import Listener
from ngrokd.datapath.splice import DRAIN_TIMEOUT, PipeProtocol, splice
from ngrokd.devcloud.ingress import IngressFault
from ngrokd.devcloud.tap import RunningDevcloud, start_devcloud
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.signals import StopOnSignal
from ngrokd.test.helpers import (
    Counter,
    Echo,
    Recorder,
    Source,
    TCPLikeTransport,
    connect,
    free_ports,
    listen,
    settle,
    wait_until,
)

ECHO = "tcp://echo.test:7000"
BULK = "tcp://bulk.test:9"
SINK = "tcp://sink.test:10"
SECURE = "https://secure.test"


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
            (SECURE, listen(Factory.forProtocol(FlowEcho), self)),
        ]
        self.devcloud: RunningDevcloud = start_devcloud(
            reactor,
            os.path.abspath(self.mktemp()),
            [(url, ("127.0.0.1", port)) for url, port in backends],
            start_port=free_ports(16),
        )
        self.addCleanup(self.devcloud.stop)

    async def start_daemon(
        self, clock: Clock | None = None, **changes: dict[str, Any]
    ) -> Daemon:
        """
        Start a daemon with the devcloud's config, its sections changed by
        C{changes} (C{server={"shutdown_grace": 5}}), and wait until every
        endpoint listens.
        """
        config = load_config(self.devcloud.config_path).config
        config = attrs.evolve(
            config,
            **{
                name: attrs.evolve(getattr(config, name), **values)
                for name, values in changes.items()
            },
        )
        daemon = Daemon(config, reactor, clock=clock)
        daemon.startService()
        self.addCleanup(daemon.stopService)
        await wait_until(
            lambda: sum(x.listening for x in daemon.listeners.listeners.values()) == 4,
            "4 listeners",
        )
        return daemon

    def port_of(self, daemon: Daemon, url: str) -> int:
        return self.listener(daemon, url).spec.port

    def listener(self, daemon: Daemon, url: str) -> Listener:
        return daemon.listeners.listeners[parse_endpoint_url(url).url]

    def open_connections(self, daemon: Daemon) -> int:
        """
        Connections the daemon carries, and the devcloud's ingress holds.
        """
        local = sum(
            len(x.factory.connections) for x in daemon.listeners.listeners.values()
        )
        return local + len(self.devcloud.ingress.carrying)

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
        files return to what they were before (but for the descriptors set
        aside for the next connections) once the warm connections are
        closed after the quiet period.
        """

        async def run() -> None:
            daemon = await self.start_daemon(
                ingress={"pool_idle_timeout": 1.0, "pool_linger": 1.0}
            )
            baseline = open_fds()
            clients = [
                socket.create_connection(("127.0.0.1", self.port_of(daemon, ECHO)))
                for _ in range(3)
            ]
            try:
                for client in clients:
                    client.setblocking(False)
                await _fill(clients)
                self.assertEqual(len(self.devcloud.ingress.carrying), 3)
            finally:
                for client in clients:
                    client.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    client.close()
            await wait_until(
                lambda: self.open_connections(daemon) == 0, "no connections left"
            )
            # The daemon keeps a few descriptors aside for the next ones.
            spares = daemon.connector.descriptors
            await wait_until(
                lambda: open_fds() <= baseline + spares.held, "open files at baseline"
            )

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
            (ingress,) = self.devcloud.ingress.carrying
            # What the kernel does for a killed process: a FIN, under TLS.
            ingress.transport.transport.socket.shutdown(socket.SHUT_WR)
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

    def test_burstLargerThanDialCapIsQueued(self) -> Deferred[None]:
        """
        A burst of more connections than C{ingress.max_pending_dials} is
        held, not refused: no more dials than the cap reach the ingress at
        once, the others wait with their input kept, and every one gets its
        round trip once dials finish.
        """

        async def run() -> None:
            # Warm connections count against the cap too; here, none.
            daemon = await self.start_daemon(
                ingress={"max_pending_dials": 2, "pool_size": 0}
            )
            self.devcloud.ingress.inject(ECHO, IngressFault(stall=True))
            port = self.port_of(daemon, ECHO)
            clients = [Recorder() for _ in range(10)]
            for n, client in enumerate(clients):
                await connect(port, client)
                client.transport.write(b"burst %d" % n)
                client.transport.loseWriteConnection()
            ingress = self.devcloud.ingress
            self.assertEqual(await settle(lambda: ingress.connections_total), 2)
            self.assertEqual(daemon.connector.queue.waiting, 8)
            self.devcloud.ingress.inject(ECHO, None)
            await ingress.close_all()  # the two stalled dials fail
            for n, client in enumerate(clients[2:], 2):
                await client.lost
                self.assertEqual(client.received, b"burst %d" % n)
            self.assertEqual(ingress.connections_total, 10)

        return ensureDeferred(run())

    def test_floodOfFailuresLogsBoundedLines(self) -> Deferred[None]:
        """
        Thirty connections refused by the ingress make one line for the
        first failure and (when the daemon stops) one counting the others,
        not a line per connection.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            daemon = await self.start_daemon()
            self.devcloud.ingress.inject(
                ECHO, IngressFault(error_code="ERR_NGROK_3200")
            )
            port = self.port_of(daemon, ECHO)
            for _ in range(30):
                client = Recorder()
                await connect(port, client)
                await client.lost
            await daemon.stopService()
            url = parse_endpoint_url(ECHO).url
            failures = [
                e.get("count")
                for e in events
                if e.get("url") == url and "error_type" in e
            ]
            self.assertEqual(failures, [None, 29])

        return ensureDeferred(run())

    def test_noticeOnEveryConnectionLoggedOnce(self) -> Deferred[None]:
        """
        A notice the ingress sends with every connection is logged once.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            daemon = await self.start_daemon()
            self.devcloud.ingress.inject(ECHO, IngressFault(notices=("maintenance",)))
            for n in range(10):
                client = Recorder()
                await connect(self.port_of(daemon, ECHO), client)
                client.transport.write(b"%d" % n)
                client.transport.loseWriteConnection()
                await client.lost
                self.assertEqual(client.received, b"%d" % n)
            notices = [e for e in events if e.get("notice") == "maintenance"]
            self.assertEqual(len(notices), 1)

        return ensureDeferred(run())

    def test_stopLetsShortTransferFinishAndResetsLongOne(self) -> Deferred[None]:
        """
        On stop, the daemon stops accepting at once; a connection that
        finishes within C{server.shutdown_grace} ends cleanly, and one still
        open after it is reset.
        """

        async def run() -> None:
            clock = Clock()
            daemon = await self.start_daemon(clock, server={"shutdown_grace": 30.0})
            port = self.port_of(daemon, ECHO)
            short, long = Recorder(), Recorder()
            for client in (short, long):
                await connect(port, client)
                client.transport.write(b"hello")
                await wait_until(_echoed(client, b"hello"), "an echo")
            stopping = daemon.stopService()
            await wait_until(lambda: not daemon.listeners.listeners, "listeners gone")
            with self.assertRaises(ConnectionRefusedError):
                await connect(port, Recorder())
            short.transport.write(b" world")
            short.transport.loseWriteConnection()
            await short.lost
            self.assertEqual(short.received, b"hello world")
            self.assertIsNotNone(short.reason.check(ConnectionDone))  # type: ignore[union-attr]
            self.assertNoResult(stopping)
            clock.advance(30)
            await stopping
            self.assertIsNotNone(long.reason)
            self.assertIsNone(long.reason.check(ConnectionDone))  # type: ignore[union-attr]

        return ensureDeferred(run())

    def test_silentlyDeadPeersProbed(self) -> Deferred[None]:
        """
        Both legs of a connection use TCP keepalive, so a peer that vanished
        without a word (no FIN, no reset) is found by the kernel's probes.
        """

        if not hasattr(socket, "TCP_KEEPIDLE"):
            raise SkipTest("the keepalive timing is set only where TCP_KEEPIDLE is")

        async def run() -> None:
            daemon = await self.start_daemon()
            client = Recorder()
            await connect(self.port_of(daemon, ECHO), client)
            client.transport.write(b"ping")
            await wait_until(_echoed(client, b"ping"), "an echo")
            (local,) = self.listener(daemon, ECHO).factory.connections
            assert local.ingress is not None
            legs = [local.transport, local.ingress.transport.transport]
            for leg in legs:
                handle = leg.getHandle()
                options = [
                    handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                ]
                self.assertEqual(options, [1, KEEPALIVE_IDLE])

        return ensureDeferred(run())

    def test_idleConnectionReset(self) -> Deferred[None]:
        """
        With C{server.idle_timeout}, a connection on which nothing moves for
        that long is reset, and its ingress connection closed.
        """

        async def run() -> None:
            daemon = await self.start_daemon(server={"idle_timeout": 0.5})
            client = Recorder()
            await connect(self.port_of(daemon, ECHO), client)
            client.transport.write(b"ping")
            await wait_until(_echoed(client, b"ping"), "an echo")
            await wait_until(lambda: client.reason is not None, "the idle reset")
            self.assertIsNone(client.reason.check(ConnectionDone))  # type: ignore[union-attr]
            await wait_until(
                lambda: self.open_connections(daemon) == 0, "no connections left"
            )

        return ensureDeferred(run())

    def test_httpsInNetworkModeWarnsOnce(self) -> Deferred[None]:
        """
        An https endpoint in network mode carries TLS, which the Host
        rewriter cannot read: the bytes pass unchanged, and that is said
        once for the endpoint, not for every connection.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            daemon = await self.start_daemon()
            self.assertIsNotNone(self.listener(daemon, SECURE).spec.rewrite_host)
            hello = b"\x16\x03\x01\x00\x05hello"
            for _ in range(3):
                client = Recorder()
                await connect(self.port_of(daemon, SECURE), client)
                client.transport.write(hello)
                client.transport.loseWriteConnection()
                await client.lost
                self.assertEqual(client.received, hello)
            warnings = [e for e in events if "unchanged" in e.get("log_format", "")]
            self.assertEqual(len(warnings), 1)

        return ensureDeferred(run())


class OutOfFilesTests(SynchronousTestCase):
    """
    A listener whose process has run out of file descriptors.
    """

    def test_outOfFilesSaidOnceBacksOffAndRecovers(self) -> None:
        """
        Accepts that fail for lack of descriptors are said once, with the
        limit; each pauses accepting for L{ACCEPT_BACKOFF} seconds (to
        Twisted it looks like an empty backlog, so it closes nothing); once
        accepts have worked for L{ACCEPTING_AGAIN_AFTER} seconds, that is
        said once too.
        """
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        clock = Clock()
        port = FakePort()
        guard = AcceptGuard(clock)
        client = (socket.socket(), ("127.0.0.1", 4000))
        self.addCleanup(client[0].close)
        outcomes: list[Any] = [OSError(errno.EMFILE, "Too many open files")] * 3
        listening = GuardedSocket(
            cast(socket.socket, Scripted([*outcomes, client, client])),
            cast(tcp.Port, port),
            guard,
        )
        for _ in range(3):
            with self.assertRaises(BlockingIOError):
                listening.accept()
            self.assertFalse(port.reading)
            clock.advance(ACCEPT_BACKOFF)
            self.assertTrue(port.reading)
        self.assertIs(listening.accept(), client)
        clock.advance(ACCEPTING_AGAIN_AFTER)
        self.assertIs(listening.accept(), client)
        formats = [e["log_format"] for e in events]
        self.assertEqual(len(formats), 2)
        self.assertIn("open-file limit", formats[0])
        self.assertIn("accepting connections again", formats[1])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_noDescriptorForTheLegLeavesConnectionInBacklog(self) -> None:
        """
        When no descriptor can be set aside for a connection's ingress leg,
        the listener does not accept it: it stays in the kernel's backlog,
        accepting pauses as when the accept itself fails, and the connection
        is accepted once descriptors are free.
        """
        clock = Clock()
        port = FakePort()
        reserve = ShortReserve()
        guard = AcceptGuard(clock, reserve, lambda: 2)
        client = (socket.socket(), ("127.0.0.1", 4000))
        self.addCleanup(client[0].close)
        backlog = Scripted([client])
        listening = GuardedSocket(
            cast(socket.socket, backlog), cast(tcp.Port, port), guard
        )
        with self.assertRaises(BlockingIOError):
            listening.accept()
        self.assertEqual(backlog.outcomes, [client])
        self.assertFalse(port.reading)
        reserve.short = False
        clock.advance(ACCEPT_BACKOFF)
        self.assertIs(listening.accept(), client)
        self.assertEqual(reserve.asked, [2 + 1 + SPARE] * 2)


class ShortReserve(DescriptorReserve):
    """
    A reserve that records what it is asked to hold, and cannot while
    C{short}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.short = True
        self.asked: list[int] = []

    def hold(self, count: int) -> None:
        self.asked.append(count)
        if self.short:
            raise OSError(errno.EMFILE, "Too many open files")


class FakePort:
    """
    The part of a listening port the guard uses.
    """

    connected = True
    disconnecting = False
    reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class Scripted:
    """
    A listening socket whose C{accept} raises or returns what it is given,
    in order.
    """

    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes

    def accept(self) -> Any:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


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
            end.makeConnection(TCPLikeTransport())
        splice(a, b, clock)
        b.dataReceived(b"the rest of the reply")
        a.readConnectionLost()
        b.readConnectionLost()
        self.assertTrue(a.transport.disconnecting)
        clock.advance(DRAIN_TIMEOUT - 1)
        self.assertFalse(a.transport.disconnected)
        clock.advance(1)
        self.assertTrue(a.transport.disconnected)
        self.assertTrue(b.transport.disconnected)


class DoubleSignalTests(SynchronousTestCase):
    """
    L{StopOnSignal}: SIGTERM or SIGINT stops gracefully; a second one stops
    at once.
    """

    def test_secondSignalStopsAtOnce(self) -> None:
        """
        The first signal stops the reactor as its own handler would (and so
        the daemon, with its grace), keeping the signal for twistd's exit;
        the second, which the reactor alone would answer with a traceback,
        ends the grace instead.
        """
        handlers: dict[int, Any] = {}
        fake = FakeReactor()
        daemon = cast(Daemon, fake)
        StopOnSignal(daemon, fake, handlers.__setitem__).privilegedStartService()
        self.assertEqual(set(handlers), {signal.SIGTERM, signal.SIGINT})
        handlers[signal.SIGTERM](signal.SIGTERM, None)
        self.assertEqual((fake.stops, fake.cut), (1, False))
        self.assertEqual(fake._exitSignal, signal.SIGTERM)
        handlers[signal.SIGINT](signal.SIGINT, None)
        self.assertEqual((fake.stops, fake.cut), (1, True))

    def test_reactorStoppingAlready(self) -> None:
        """
        A first signal that finds the reactor stopping already (its own
        handler took a signal as it started) adds no second stop, and
        no error; the reactor keeps the signal it stopped for.
        """
        handlers: dict[int, Any] = {}
        fake = FakeReactor()
        fake.stop()
        fake._exitSignal = signal.SIGINT
        StopOnSignal(
            cast(Daemon, fake), fake, handlers.__setitem__
        ).privilegedStartService()
        handlers[signal.SIGTERM](signal.SIGTERM, None)
        self.assertEqual(
            (fake.stops, fake.cut, fake._exitSignal), (1, False, signal.SIGINT)
        )


class FakeReactor:
    """
    A running reactor, as far as L{StopOnSignal} uses one (and the daemon's
    L{Daemon.stop_now}).
    """

    running = True
    stops = 0
    cut = False
    _exitSignal: int | None = None

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        f(*args)

    def stop(self) -> None:
        if self.stops:
            raise ReactorNotRunning()
        self.stops += 1

    def stop_now(self) -> None:
        self.cut = True

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Callable[..., object]
    ) -> object:
        raise AssertionError("running, the reactor's own handlers are in place")


def _echoed(client: Recorder, data: bytes) -> Callable[[], bool]:
    return lambda: client.received == data


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
