"""
Tests for L{ngrokd.control.health}: the daemon built by C{makeService}
against the devcloud, asked over real HTTP on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Set
from io import BytesIO
from ipaddress import ip_network
from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from ngrokd.board import RowIndex, StatusBoard
from ngrokd.config import DnsConfig, LoadedConfig, load_config
from ngrokd.control.feed import EventFeed
from ngrokd.control.health import (
    IDLE_TIMEOUT,
    HealthService,
    StatusPieces,
    go_duration,
    health_site,
    readiness_text,
    rfc3339,
    status_document,
)
from ngrokd.control.httpsite import (
    MAX_CONNECTIONS,
    MAX_PER_PEER,
    REFUSED_LOG_INTERVAL,
    REQUEST_DEADLINE,
    REQUEST_TIMEOUT_ANSWER,
)
from ngrokd.control.render import status_lines
from ngrokd.control.web import STREAM_WAIT, WebPage
from ngrokd.daemon import Daemon
from ngrokd.devcloud.tap import RunningDevcloud, start_devcloud
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.host.allocation import IPAddress
from ngrokd.host.netif.memory import MemoryInterface
from ngrokd.host.netif.service import InterfaceService
from ngrokd.status import FAILED, LISTENING, DaemonStatus, EndpointStatus
from ngrokd.tap import Options, makeService
from ngrokd.test.helpers import (
    Echo,
    Recorder,
    exchange,
    free_ports,
    listen,
    ready_status,
    wait_until,
)


@attrs.frozen
class Answer:
    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str:
        return ",".join(self.headers.getRawHeaders(name, []))

    def json(self) -> Any:
        return json.loads(self.body)


async def http(
    url: str, method: bytes = b"GET", body: bytes = b"", host: str | None = None
) -> Answer:
    """
    One request on a connection of its own, closed after the answer; with
    C{host} as its C{Host} header when given.
    """
    producer = FileBodyProducer(BytesIO(body)) if body else None
    headers = Headers({b"Host": [host.encode()]}) if host else None
    response = await Agent(reactor).request(
        method, url.encode("ascii"), headers, producer
    )
    body = await readBody(response)
    return Answer(response.code, response.headers, body)


class DaemonHealthTestCase(TestCase):
    """
    A devcloud with an echo endpoint, and a daemon made by C{makeService}
    with its health server on a free loopback port.
    """

    timeout = 60
    endpoints = ["tcp://echo.test:7000"]
    #: The daemon's C{dns} settings, when not the devcloud config's.
    dns: DnsConfig | None = None

    def setUp(self) -> None:
        self.echo_port = listen(Factory.forProtocol(Echo), self)
        self.start_port = free_ports(16)
        self.devcloud: RunningDevcloud = start_devcloud(
            reactor,
            os.path.abspath(self.mktemp()),
            [(url, ("127.0.0.1", self.echo_port)) for url in self.endpoints],
            start_port=self.start_port,
        )
        self.addCleanup(self.devcloud.stop)

    def make_daemon(self, health_address: str = "") -> Daemon:
        """
        The service tree C{twistd ngrokd} runs, not started.
        """
        config = load_config(self.devcloud.config_path).config
        address = health_address or f"127.0.0.1:{free_ports(1)}"
        server = attrs.evolve(config.server, health_address=address)
        config = attrs.evolve(config, server=server, dns=self.dns or config.dns)
        options = Options()
        options.loaded = LoadedConfig(config, ())
        daemon = makeService(options, reactor)
        assert isinstance(daemon, Daemon)
        return daemon

    async def start(self, health_address: str = "", listening: int = 1) -> Daemon:
        """
        Start a daemon and wait until its health server and C{listening}
        endpoint listeners are up.
        """
        daemon = self.make_daemon(health_address)
        daemon.startService()
        self.addCleanup(daemon.stopService)
        health = self.health(daemon)
        await wait_until(lambda: health.port is not None, "the health server")
        await wait_until(
            lambda: (
                sum(x.listening for x in daemon.listeners.listeners.values())
                == listening
            ),
            f"{listening} listeners",
        )
        return daemon

    def health(self, daemon: Daemon) -> HealthService:
        service = daemon.getServiceNamed("health")
        assert isinstance(service, HealthService)
        return service

    def url(self, daemon: Daemon, path: str) -> str:
        return f"http://{self.health(daemon).address}{path}"

    def port_of(self, daemon: Daemon, url: str) -> int:
        return daemon.listeners.listeners[parse_endpoint_url(url).url].spec.port


class NoEndpointsTests(DaemonHealthTestCase):
    """
    A daemon that has nothing to serve is alive and ready.
    """

    endpoints: list[str] = []

    def test_idleDaemonHealthyAndReady(self) -> Deferred[None]:
        """
        With zero endpoints C{/healthz} and C{/readyz} answer 200 once the
        first poll is applied, and C{/status} lists no endpoint.
        """

        async def run() -> None:
            daemon = await self.start(listening=0)
            alive = await http(self.url(daemon, "/healthz"))
            self.assertEqual((alive.code, alive.body), (200, b"healthy\n"))
            await wait_until(lambda: daemon.daemon_status().ready, "ready")
            ready = await http(self.url(daemon, "/readyz"))
            self.assertEqual((ready.code, ready.body), (200, b"ready\n"))
            status = (await http(self.url(daemon, "/status"))).json()
            self.assertEqual(
                (status["healthy"], status["ready"], status["endpoints"]),
                (True, True, {}),
            )

        return ensureDeferred(run())


class ReadinessTests(DaemonHealthTestCase):
    """
    C{/readyz} follows the daemon's way to ready, and says what is missing.
    """

    def test_beforeAndAfterFirstPoll(self) -> Deferred[None]:
        """
        While the first poll fails the daemon is alive but not ready, and the
        answer says why; once a poll is applied it is ready.
        """

        async def run() -> None:
            self.devcloud.cloud.faults.next_status(
                503, count=1, path_contains="bound_endpoints"
            )
            daemon = self.make_daemon()
            daemon.startService()
            self.addCleanup(daemon.stopService)
            health = self.health(daemon)
            await wait_until(lambda: health.port is not None, "the health server")
            await wait_until(lambda: daemon.discovery.failures == 1, "a failed poll")
            alive = await http(self.url(daemon, "/healthz"))
            self.assertEqual(alive.code, 200)
            waiting = await http(self.url(daemon, "/readyz"))
            self.assertEqual(waiting.code, 503)
            self.assertTrue(
                waiting.body.startswith(
                    b"not ready: the bound endpoints have not been read yet: "
                ),
                waiting.body,
            )
            self.assertIn(b"503", waiting.body)
            daemon.discovery.poll_now()
            await wait_until(lambda: daemon.daemon_status().ready, "ready")
            ready = await http(self.url(daemon, "/readyz"))
            self.assertEqual((ready.code, ready.body), (200, b"ready\n"))

        return ensureDeferred(run())

    def test_listenerCannotBind(self) -> Deferred[None]:
        """
        An endpoint whose port is taken keeps the daemon not ready, with the
        endpoint and the reason in the answer; the process stays healthy.
        """

        async def run() -> None:
            taken = socket.socket()
            self.addCleanup(taken.close)
            taken.bind(("127.0.0.1", self.start_port))
            taken.listen(1)
            daemon = await self.start(listening=0)
            await wait_until(
                lambda: (
                    daemon.daemon_status().polled
                    and any(x.error for x in daemon.listeners.listeners.values())
                ),
                "the failed listener",
            )
            answer = await http(self.url(daemon, "/readyz"))
            self.assertEqual(answer.code, 503)
            lines = answer.body.decode().splitlines()
            self.assertEqual(lines[0], "not ready: 0 of 1 listeners are up")
            self.assertTrue(
                lines[1].startswith(
                    f"tcp://echo.test:7000: 127.0.0.1:{self.start_port} is already"
                    " in use"
                ),
                lines,
            )
            self.assertEqual((await http(self.url(daemon, "/healthz"))).code, 200)
            status = (await http(self.url(daemon, "/status"))).json()
            (row,) = status["endpoints"].values()
            self.assertEqual(
                (status["healthy"], status["ready"], row["state"], row["active"]),
                (False, False, "failed", False),
            )

        return ensureDeferred(run())


class StallingInterface(MemoryInterface):
    """
    A memory interface whose address changes stall, while C{stall} is set,
    until it fires.
    """

    def __init__(self) -> None:
        super().__init__(ip_network("10.107.0.0/24"))
        self.stall: Deferred[None] | None = None
        self.stalled = False

    def ensure_addresses(self, addresses: Set[IPAddress]) -> Deferred[None]:
        if self.stall is None:
            return super().ensure_addresses(addresses)
        self.stalled = True
        return self.stall


class StalledReconcileTests(DaemonHealthTestCase):
    """
    Status answers while a reconcile is stalled (the original held its lock
    over a poll's slow work, so C{status} and C{list} hung with it: fault 30).
    """

    def test_statusWhileStalled(self) -> Deferred[None]:
        """
        While a reconcile waits for an interface step that does not return,
        C{ngrokctl status}, C{ngrokctl list} and C{/status} answer, with what
        is served.
        """
        from ngrokd.test.test_ctl import ngrokctl

        async def run() -> None:
            sockets = tempfile.mkdtemp(prefix="ngrokd-ctl-")
            self.addCleanup(shutil.rmtree, sockets, True)
            socket_path = os.path.join(sockets, "ngrokd.sock")
            config = load_config(self.devcloud.config_path).config
            net = attrs.evolve(
                config.net,
                listen_interface="virtual",
                overrides={"echo.test": "127.0.0.1"},
                hosts_file=os.path.abspath(self.mktemp()),
            )
            server = attrs.evolve(
                config.server,
                socket_path=socket_path,
                health_address=f"127.0.0.1:{free_ports(1)}",
            )
            options = Options()
            options.loaded = LoadedConfig(
                attrs.evolve(config, net=net, server=server), ()
            )
            daemon = makeService(options, reactor)
            assert isinstance(daemon, Daemon)
            interface = StallingInterface()
            daemon.interface = InterfaceService(
                IReactorFromThreads(reactor), net, interface
            )
            daemon.startService()
            self.addCleanup(daemon.stopService)
            await wait_until(lambda: daemon.daemon_status().ready, "ready", 30)
            stall: Deferred[None] = Deferred()

            def release() -> None:
                if not stall.called:
                    stall.callback(None)

            self.addCleanup(release)
            interface.stall = stall
            daemon.discovery.poll_now()
            await wait_until(lambda: interface.stalled, "a stalled reconcile")
            status = await ngrokctl(socket_path, "status")
            self.assertEqual(status.code, 0, status.err)
            self.assertIn("Ready:        yes", status.out)
            listed = await ngrokctl(socket_path, "list", "-o", "json")
            self.assertEqual(
                [row["state"] for row in listed.json()], ["listening"], listed.err
            )
            answer = await http(self.url(daemon, "/status"))
            self.assertEqual((answer.code, answer.json()["ready"]), (200, True))
            self.assertFalse(stall.called)
            stall.callback(None)

        return ensureDeferred(run())


class StatusTests(DaemonHealthTestCase):
    """
    C{/status}: the original's fields and ours, as JSON.
    """

    def test_fields(self) -> Deferred[None]:
        """
        After one connection the document holds the original's keys with
        their meaning, and ngrokd's: identity, discovery, and each
        endpoint's addresses, state and counts.
        """

        async def run() -> None:
            daemon = await self.start()
            await wait_until(lambda: daemon.daemon_status().ready, "ready")
            port = self.port_of(daemon, "tcp://echo.test:7000")
            client = await exchange(port, b"hello")
            self.assertEqual(client.received, b"hello")
            answer = await http(self.url(daemon, "/status"))
            self.assertEqual(answer.header("content-type"), "application/json")
            status = answer.json()
            identity = daemon.identity
            assert identity is not None
            started = daemon.daemon_status().started
            self.assertEqual(
                {
                    key: status[key]
                    for key in ["healthy", "ready", "start_time", "identity"]
                },
                {
                    "healthy": True,
                    "ready": True,
                    "start_time": rfc3339(started),
                    "identity": {
                        "state": "registered",
                        "operator_id": identity.operator_id,
                        "certificate_expires": rfc3339(identity.not_after.timestamp()),
                        "error": "",
                    },
                },
            )
            self.assertRegex(status["uptime"], r"^[0-9.]+(ms|s)$")
            self.assertEqual(status["discovery"]["error"], "")
            self.assertIsNotNone(status["discovery"]["last_poll"])
            (endpoint,) = self.devcloud.cloud.endpoints()
            await wait_until(
                lambda: daemon.endpoint_status()[0].connections_open == 0, "close"
            )
            row = (await http(self.url(daemon, "/status"))).json()["endpoints"]
            self.assertEqual(
                row[endpoint.id],
                {
                    "name": endpoint.id,
                    "local_address": f"127.0.0.1:{port}",
                    "target_uri": "tcp://echo.test:7000",
                    "active": True,
                    "connections": 0,
                    "total_connections": 1,
                    "last_activity": None,
                    "errors": 0,
                    "id": endpoint.id,
                    "url": "tcp://echo.test:7000",
                    "listen_address": f"127.0.0.1:{port}",
                    "state": "listening",
                    "reason": "",
                    "client_address": f"127.0.0.1:{port}",
                    "connections_open": 0,
                    "connections_total": 1,
                    "bytes_up": 5,
                    "bytes_down": 5,
                    "mode": "127.0.0.1",
                    "stale": False,
                    "addresses": ["127.0.0.1"],
                    "ipv6_error": "",
                },
            )

        return ensureDeferred(run())

    def test_methods(self) -> Deferred[None]:
        """
        C{HEAD} answers like C{GET} without a body; any other method is
        refused with 405 and the methods allowed, its body unread; an
        unknown path is 404.
        """

        async def run() -> None:
            daemon = await self.start()
            head = await http(self.url(daemon, "/healthz"), b"HEAD")
            self.assertEqual((head.code, head.body), (200, b""))
            for method in [b"POST", b"PUT", b"DELETE"]:
                refused = await http(
                    self.url(daemon, "/status"), method, body=b"z" * 2**20
                )
                self.assertEqual(refused.code, 405, method)
                self.assertEqual(refused.header("allow"), "GET, HEAD")
            self.assertEqual((await http(self.url(daemon, "/nothing"))).code, 404)

        return ensureDeferred(run())


class ForeignHostTests(DaemonHealthTestCase):
    """
    The C{Host} rule holds on the paths probes and scrapers use, as on the
    page: a name that is not an address, C{localhost} or one of
    C{server.web_hosts} (what a DNS-rebinding page sends) gets 403, and
    what probes send is answered.
    """

    def host_rule_on(
        self, paths: list[str], check: Callable[[Answer], object]
    ) -> Deferred[None]:
        """
        On each of C{paths} of a ready daemon, foreign names get 403 with
        nothing of the status, and addresses and C{localhost} get 200 and
        an answer that passes C{check}.
        """

        async def run() -> None:
            daemon = await self.start()
            await wait_until(lambda: daemon.daemon_status().ready, "ready")
            operator = daemon.daemon_status().operator_id.encode()
            port = self.health(daemon).address.rpartition(":")[2]
            for path in paths:
                url = self.url(daemon, path)
                for name in [f"rebind.test:{port}", "localhost.rebind.test"]:
                    refused = await http(url, host=name)
                    self.assertEqual(refused.code, 403, (path, name))
                    self.assertIn(b"server.web_hosts", refused.body)
                    self.assertNotIn(operator, refused.body)
                for name in [f"127.0.0.1:{port}", f"localhost:{port}", "[::1]:8081"]:
                    answered = await http(url, host=name)
                    self.assertEqual(answered.code, 200, (path, name))
                    check(answered)

        return ensureDeferred(run())

    def test_status(self) -> Deferred[None]:
        """
        C{/status}, with the operator id and every endpoint, is refused to
        a foreign name.
        """
        return self.host_rule_on(
            ["/status"],
            lambda answer: self.assertTrue(answer.json()["identity"]["operator_id"]),
        )

    def test_metrics(self) -> Deferred[None]:
        """
        C{/metrics} is refused to a foreign name.
        """
        return self.host_rule_on(
            ["/metrics"], lambda answer: self.assertIn(b"ngrokd_ready 1.0", answer.body)
        )

    def test_readyz(self) -> Deferred[None]:
        """
        C{/readyz} (and the original's C{/ready}) is refused to a foreign
        name.
        """
        return self.host_rule_on(
            ["/readyz", "/ready"],
            lambda answer: self.assertEqual(answer.body, b"ready\n"),
        )

    def test_healthz(self) -> Deferred[None]:
        """
        C{/healthz} (and the original's C{/health}) is refused to a foreign
        name too: one rule for every path.
        """
        return self.host_rule_on(
            ["/healthz", "/health"],
            lambda answer: self.assertEqual(answer.body, b"healthy\n"),
        )


class AddressTests(DaemonHealthTestCase):
    """
    Where the health server listens, and what happens when it cannot.
    """

    def test_ipv6(self) -> Deferred[None]:
        """
        An IPv6 address in brackets is listened on.
        """

        async def run() -> None:
            try:
                with socket.socket(socket.AF_INET6) as probe:
                    probe.bind(("::1", 0))
            except OSError:
                self.skipTest("no IPv6 loopback here")
            daemon = await self.start(f"[::1]:{free_ports(1)}")
            self.assertEqual((await http(self.url(daemon, "/healthz"))).code, 200)

        return ensureDeferred(run())

    def test_everyAddress(self) -> Deferred[None]:
        """
        C{0.0.0.0}, as in a container, answers on loopback too.
        """

        async def run() -> None:
            port = free_ports(1)
            daemon = await self.start(f"0.0.0.0:{port}")
            self.assertEqual(
                self.health(daemon).port.getHost().host,  # type: ignore[union-attr]
                "0.0.0.0",
            )
            answer = await http(f"http://127.0.0.1:{port}/healthz")
            self.assertEqual(answer.code, 200)

        return ensureDeferred(run())

    def test_portTaken(self) -> Deferred[None]:
        """
        A health port in use is logged as an error naming the address and
        what to do, and the daemon serves its endpoints all the same.
        """

        async def run() -> None:
            taken = socket.socket()
            self.addCleanup(taken.close)
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            address = f"127.0.0.1:{taken.getsockname()[1]}"
            events = EventLoggingObserver()
            globalLogPublisher.addObserver(events)
            self.addCleanup(globalLogPublisher.removeObserver, events)
            daemon = self.make_daemon(address)
            daemon.startService()
            self.addCleanup(daemon.stopService)
            health = self.health(daemon)
            await wait_until(lambda: bool(health.error), "the bind failure")
            await wait_until(lambda: daemon.daemon_status().ready, "ready")
            (error,) = [
                e
                for e in events
                if e["log_level"] == LogLevel.error and e.get("address") == address
            ]
            self.assertEqual(error["error"], "Address already in use")
            self.assertIn("server.health_address", error["log_format"])
            self.assertIsNone(health.port)

        return ensureDeferred(run())


class _Rows:
    """
    A daemon's status and kept rows, given.
    """

    def __init__(self, status: DaemonStatus, rows: list[EndpointStatus]) -> None:
        self.status = status
        self.board = RowIndex.of(rows)

    def daemon_status(self) -> DaemonStatus:
        return self.status

    def endpoint_status(self) -> tuple[EndpointStatus, ...]:
        return tuple(self.board.in_order())


class StreamedStatusTests(SynchronousTestCase):
    """
    C{/status} is written in pieces from the kept rows: the bytes are those
    of the whole document written at once, as before.
    """

    def test_sameDocument(self) -> None:
        """
        For thousands of endpoints, failed ones among them (not healthy),
        and again after one row changed (kept texts reused), the pieces
        make the document L{status_document} gives, as C{json.dumps}
        writes it.
        """
        rows = [
            EndpointStatus(
                f"ep_{n:05}",
                f"tcp://db{n}.prod:5432",
                f"127.0.0.1:{20000 + n}",
                FAILED if n % 997 == 0 else LISTENING,
                "in use" if n % 997 == 0 else "",
                client_address=f"127.0.0.1:{20000 + n}",
                connections_total=n,
                bytes_up=n * 7,
                mode="127.0.0.1",
            )
            for n in range(3000)
        ]
        source = _Rows(ready_status(), rows)
        pieces = StatusPieces()
        for _ in range(2):
            expected = status_document(source.status, source.endpoint_status())
            written = list(pieces.pieces(source))
            self.assertGreater(len(written), 3)
            self.assertEqual(
                b"".join(written), json.dumps(expected).encode("utf-8") + b"\n"
            )
            self.assertFalse(json.loads(b"".join(written))["healthy"])
            source.board.put(attrs.evolve(rows[5], errors=9))

    def test_healthyAndEmpty(self) -> None:
        """
        Without failed endpoints a ready daemon is healthy; without any, the
        endpoints are an empty object.
        """
        for rows in ([], [EndpointStatus("a", "tcp://a.b:1", "x:1", LISTENING, "")]):
            source = _Rows(ready_status(), rows)
            written = b"".join(StatusPieces().pieces(source))
            expected = status_document(source.status, tuple(rows))
            self.assertEqual(written, json.dumps(expected).encode() + b"\n")
            self.assertTrue(json.loads(written)["healthy"])


class FormatTests(SynchronousTestCase):
    """
    Times as the original wrote them.
    """

    def test_goDuration(self) -> None:
        """
        Durations read like Go's C{time.Duration.String}.
        """
        for seconds, text in [
            (0, "0s"),
            (0.25, "250ms"),
            (0.0015, "1.5ms"),
            (2e-6, "2µs"),
            (3.5, "3.5s"),
            (60, "1m0s"),
            (3723.5, "1h2m3.5s"),
            (7200, "2h0m0s"),
        ]:
            self.assertEqual(go_duration(seconds), text)

    def test_rfc3339(self) -> None:
        """
        Seconds since the epoch as RFC 3339 in UTC; none stays none.
        """
        self.assertEqual(rfc3339(1.5), "1970-01-01T00:00:01.500000Z")
        self.assertEqual(rfc3339(0), "1970-01-01T00:00:00Z")
        self.assertIsNone(rfc3339(None))


class _Status:
    """
    A daemon's status, for a site without a daemon.
    """

    board = StatusBoard(dict)

    def daemon_status(self) -> DaemonStatus:
        return ready_status()

    def endpoint_status(self) -> tuple[EndpointStatus, ...]:
        return ()


class SiteTestCase(TestCase):
    """
    The health server's site on a real loopback port, its timers on a
    L{Clock}: clients from several loopback addresses, held as long as the
    test likes.
    """

    timeout = 60

    def setUp(self) -> None:
        self.clock = Clock()
        status = _Status()
        self.feed = EventFeed(status.daemon_status, status.board, self.clock)
        self.feed.startService()
        self.addCleanup(self.feed.stopService)
        self.web = WebPage(
            status.daemon_status,
            status.board,
            self.feed,
            lambda: (None, None),
            (),
            self.clock,
        )
        self.registry = CollectorRegistry()
        self.site = health_site(status, self.registry, self.web, self.clock)
        # Last: every connection closed before the test ends.
        self.addCleanup(self.all_closed)
        self.port = listen(self.site, self)

    async def all_closed(self) -> None:
        self.web.stop()
        await wait_until(lambda: not self.site.open, "every connection closed")

    async def connect(self, source: str = "127.0.0.1", accepted: bool = True) -> Any:
        """
        A client connected from C{source}; when C{accepted}, once the
        server has it.
        """
        before = self.site.open[source]
        client = Recorder()
        endpoint = TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.port, bindAddress=(source, 0)
        )
        await connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.transport.loseConnection() and None)
        if accepted:
            await wait_until(lambda: self.site.open[source] > before, "the accept")
        return client

    async def answered(self, source: str = "127.0.0.1") -> bytes:
        """
        The answer to C{GET /healthz} on a new connection from C{source}.
        """
        client = await self.connect(source)
        client.transport.write(
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        await client.lost
        return bytes(client.received)

    async def refused(self, source: str = "127.0.0.1") -> None:
        """
        A connection from C{source} is closed as it is accepted, unanswered.
        """
        client = await self.connect(source, accepted=False)
        await wait_until(lambda: client.lost.called, "the refused connection closed")
        self.assertEqual(client.received, b"")

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


class RequestDeadlineTests(SiteTestCase):
    """
    A request must arrive whole within L{REQUEST_DEADLINE} seconds of its
    first byte, however it trickles in; then the connection is closed with
    408.
    """

    async def trickle(self, client: Any, pieces: list[bytes]) -> None:
        """
        Send C{pieces} one every quarter of the deadline, each read by the
        server (its idle timer restarted), the connection open meanwhile.
        """
        step = REQUEST_DEADLINE / len(pieces)
        for piece in pieces:
            client.transport.write(piece)
            await wait_until(
                lambda: any(
                    call.getTime() == self.clock.seconds() + IDLE_TIMEOUT
                    for call in self.clock.getDelayedCalls()
                ),
                "the server to read",
            )
            self.assertFalse(client.lost.called)
            self.clock.advance(step)

    async def assert_timed_out(self, client: Any) -> None:
        await wait_until(lambda: client.lost.called, "the connection closed")
        self.assertTrue(
            client.received.endswith(REQUEST_TIMEOUT_ANSWER), client.received
        )
        self.assertEqual(self.metric("ngrokd_http_requests_timed_out_total"), 1)

    def test_trickledHead(self) -> Deferred[None]:
        """
        A client that sends its header lines slowly, each well within the
        idle timeout, is closed at the deadline.
        """

        async def run() -> None:
            client = await self.connect()
            lines = [b"GET /status HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n"]
            await self.trickle(client, lines + [b"X-Slow: 1\r\n"] * 2)
            await self.assert_timed_out(client)

        return ensureDeferred(run())

    def test_trickledBody(self) -> Deferred[None]:
        """
        A whole head then a body sent slowly is closed at the deadline too.
        """

        async def run() -> None:
            client = await self.connect()
            head = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            body = [b"Content-Length: 9\r\n\r\n", b"b", b"o", b"d"]
            await self.trickle(client, [head + body[0], *body[1:]])
            await self.assert_timed_out(client)

        return ensureDeferred(run())

    def test_nextRequest(self) -> Deferred[None]:
        """
        On a kept-alive connection the next request has its own deadline,
        from its first byte: the idle time before it does not count.
        """

        async def run() -> None:
            client = await self.connect()
            client.transport.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await wait_until(lambda: b"healthy\n" in client.received, "the answer")
            client.received = b""
            self.clock.advance(IDLE_TIMEOUT / 2)
            self.assertFalse(client.lost.called)
            await self.trickle(
                client, [b"GET /status HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n"]
            )
            await self.assert_timed_out(client)

        return ensureDeferred(run())

    def test_eventStreamOutlivesDeadline(self) -> Deferred[None]:
        """
        An event stream, whose request arrived in time, stays open past the
        deadline and goes on receiving.
        """

        async def run() -> None:
            client = await self.connect()
            client.transport.write(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await wait_until(lambda: b"retry: 2000" in client.received, "the stream")
            self.clock.advance(STREAM_WAIT)
            self.assertGreater(STREAM_WAIT, REQUEST_DEADLINE)
            await wait_until(lambda: b": waiting" in client.received, "a keep-alive")
            self.assertFalse(client.lost.called)
            self.assertEqual(self.metric("ngrokd_http_requests_timed_out_total"), 0)

        return ensureDeferred(run())


class ConnectionCapTests(SiteTestCase):
    """
    Connections are capped per peer address and in all; one past a cap is
    closed at accept, counted and logged at most once a minute.
    """

    def test_perPeer(self) -> Deferred[None]:
        """
        Past L{MAX_PER_PEER} connections from one address (an event stream
        among them) the next from it is refused, while another address is
        answered; once one closes, the address is answered again, and the
        event stream goes on.
        """

        async def run() -> None:
            stream = await self.connect()
            stream.transport.write(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await wait_until(lambda: bool(self.web.streams), "the stream")
            held = [await self.connect() for _ in range(MAX_PER_PEER - 1)]
            await self.refused()
            self.assertIn(b" 200 OK", await self.answered("127.0.0.2"))
            self.assertEqual(
                self.metric("ngrokd_http_connections_refused_total", limit="peer"), 1
            )
            self.assertEqual(self.metric("ngrokd_http_connections_open"), MAX_PER_PEER)
            held[0].transport.loseConnection()
            await wait_until(
                lambda: self.site.open["127.0.0.1"] < MAX_PER_PEER, "the close"
            )
            self.assertIn(b" 200 OK", await self.answered())
            # The idle ones time out; the stream, whose request came, not.
            self.clock.advance(STREAM_WAIT)
            await wait_until(lambda: b": waiting" in stream.received, "a keep-alive")
            self.assertFalse(stream.lost.called)

        return ensureDeferred(run())

    def test_total(self) -> Deferred[None]:
        """
        Past L{MAX_CONNECTIONS} in all, a connection from a new address is
        refused too.
        """

        async def run() -> None:
            for n in range(MAX_CONNECTIONS):
                await self.connect(f"127.0.0.{2 + n // MAX_PER_PEER}")
            await self.refused("127.0.1.1")
            self.assertEqual(
                self.metric("ngrokd_http_connections_refused_total", limit="total"), 1
            )

        return ensureDeferred(run())

    def test_loggedAtMostOnceAMinute(self) -> Deferred[None]:
        """
        The first refusal is logged with the peer and the limit; the next
        within L{REFUSED_LOG_INTERVAL} only counted, then told in the next
        line.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            for _ in range(MAX_PER_PEER):
                await self.connect()
            for _ in range(3):
                await self.refused()
            # The held connections time out meanwhile: hold as many again.
            self.clock.advance(REFUSED_LOG_INTERVAL)
            await wait_until(lambda: not self.site.open, "the held ones closed")
            for _ in range(MAX_PER_PEER):
                await self.connect()
            await self.refused()
            lines = [e for e in events if "peer" in e and "why" in e]
            self.assertEqual(
                [(e["peer"], e["count"], e["log_level"]) for e in lines],
                [("127.0.0.1", 1, LogLevel.warn), ("127.0.0.1", 3, LogLevel.warn)],
            )
            self.assertIn("16 connections from this address", lines[0]["why"])

        return ensureDeferred(run())


class NamesStatusTests(SynchronousTestCase):
    """
    How names reach programs, as /readyz, /status and ngrokctl status say.
    """

    def test_fallbackSaid(self) -> None:
        """
        Names in the hosts file for want of DNS: /readyz of a ready daemon
        (dns.mode auto) says why in its detail, /status has it, and so has
        ngrokctl status.
        """
        status = ready_status(
            names_via="the hosts file; DNS server on 10.107.0.1:53",
            names_fallback="systemd-resolved stopped",
        )
        self.assertEqual(
            readiness_text(status, ()),
            "ready\nnames are in the hosts file: systemd-resolved stopped\n",
        )
        self.assertEqual(
            status_document(status, ())["names"],
            {
                "via": "the hosts file; DNS server on 10.107.0.1:53",
                "fallback": "systemd-resolved stopped",
                "strict": False,
            },
        )
        fields = {**attrs.asdict(status), "ready": True, "not_ready_because": ""}
        fields.update(registered=True, uptime=60.0)
        self.assertIn(
            "Names:        through the hosts file; DNS server on 10.107.0.1:53,"
            " because systemd-resolved stopped",
            status_lines(fields, {}),
        )
