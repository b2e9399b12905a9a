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
from collections.abc import Set
from io import BytesIO
from ipaddress import ip_network
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from ngrokd.config import LoadedConfig, load_config
from ngrokd.control.health import HealthService, go_duration, rfc3339
from ngrokd.daemon import Daemon
from ngrokd.devcloud.tap import RunningDevcloud, start_devcloud
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.host.allocation import IPAddress
from ngrokd.host.netif.memory import MemoryInterface
from ngrokd.host.netif.service import InterfaceService
from ngrokd.tap import Options, makeService
from ngrokd.test.helpers import (
    Echo,
    exchange,
    free_ports,
    listen,
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


async def http(url: str, method: bytes = b"GET", body: bytes = b"") -> Answer:
    """
    One request on a connection of its own, closed after the answer.
    """
    producer = FileBodyProducer(BytesIO(body)) if body else None
    response = await Agent(reactor).request(
        method, url.encode("ascii"), bodyProducer=producer
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
        options = Options()
        options.loaded = LoadedConfig(attrs.evolve(config, server=server), ())
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
            daemon.interface = InterfaceService(reactor, net, interface)
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
