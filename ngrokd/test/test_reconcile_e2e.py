"""
Discovery, identity and reconcile end to end: the real L{Daemon} against
the devcloud on 127.0.0.1 (API over HTTPS, ingress over mutual TLS), made
to fail in every way the API can, with its key rotated, its certificate
renewed under an open connection, its operator deleted, and its endpoints
moved. Whatever fails, what works keeps working, and each change of state
is logged once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, cast

import attrs
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import TCP6ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, ServerFactory
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from ngrokd import daemon as daemon_module
from ngrokd.config import Config, load_config
from ngrokd.daemon import Daemon
from ngrokd.devcloud.cloud import Faults
from ngrokd.devcloud.tap import RunningDevcloud, start_devcloud
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.host.allocation import IP_MAPPINGS, NETWORK_PORTS
from ngrokd.host.statelock import StateDirectoryLocked, StateLock
from ngrokd.ngrok import lastgood
from ngrokd.ngrok.api import MAX_BODY, MAX_STRING, APIError
from ngrokd.ngrok.identity_service import (
    OPERATOR_DELETED,
    REGISTERED,
    WAITING_FOR_KEY,
)
from ngrokd.status import FAILED, LISTENING, EndpointStatus
from ngrokd.test.helpers import (
    Echo,
    Recorder,
    connect,
    free_ports,
    listen,
    wait_until,
)
from ngrokd.test.test_discovery import capture_logs

ECHO = "tcp://echo.test:7000"
OTHER = "tcp://other.test:7001"
POLL_FAILED = "polling the bound endpoints failed"
POLL_RECOVERED = "the ngrok API answers again"


def _serial(cert_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(cert_pem).serial_number


class ReconcileEndToEnd(TestCase):
    """
    A devcloud with two echo endpoints and a daemon polling it often.
    """

    timeout = 30

    def setUp(self) -> None:
        self.echo_port = listen(Factory.forProtocol(Echo), self)
        self.start_port = free_ports(8)
        self.devcloud: RunningDevcloud = start_devcloud(
            reactor,
            os.path.abspath(self.mktemp()),
            [
                (ECHO, ("127.0.0.1", self.echo_port)),
                (OTHER, ("127.0.0.1", self.echo_port)),
            ],
            start_port=self.start_port,
        )
        self.addCleanup(self.devcloud.stop)
        self.cloud = self.devcloud.cloud
        self.events = capture_logs(self)

    def config(self, **api: Any) -> Config:
        """
        The devcloud's ngrokd configuration, polling every 50 ms, with API
        settings changed by C{api}.
        """
        config = load_config(self.devcloud.config_path).config
        return attrs.evolve(
            config,
            api=attrs.evolve(config.api, **{"timeout": 2.0, **api}),
            bound_endpoints=attrs.evolve(config.bound_endpoints, poll_interval=0.05),
        )

    async def start_daemon(
        self, config: Config | None = None, expected: int = 2
    ) -> Daemon:
        daemon = Daemon(config or self.config(), reactor)
        daemon.startService()
        self.addCleanup(daemon.stopService)
        if expected:
            await wait_until(
                lambda: self.listening(daemon) == expected, f"{expected} listeners"
            )
        return daemon

    def listening(self, daemon: Daemon) -> int:
        return sum(x.listening for x in daemon.listeners.listeners.values())

    def ports(self, daemon: Daemon) -> dict[str, Any]:
        """
        The listening socket of each endpoint: the same objects mean nothing
        was rebound.
        """
        return {url: x.port for url, x in daemon.listeners.listeners.items()}

    def state_files(self, daemon: Daemon) -> dict[str, tuple[int, int]]:
        """
        Inode and modification time of each state file and the hosts file:
        the same values mean nothing was rewritten.
        """
        paths = [
            os.path.join(daemon.config.server.state_dir, IP_MAPPINGS),
            os.path.join(daemon.config.server.state_dir, NETWORK_PORTS),
            daemon.config.net.hosts_file,
        ]
        found = {}
        for path in paths:
            if os.path.exists(path):
                info = os.stat(path)
                found[path] = (info.st_ino, info.st_mtime_ns)
        return found

    def port_of(self, daemon: Daemon, url: str) -> int:
        return daemon.listeners.listeners[parse_endpoint_url(url).url].spec.port

    async def echo(self, daemon: Daemon, url: str = ECHO) -> None:
        """
        A round trip through C{url}'s listener reaches the backend.
        """
        client = Recorder()
        await connect(self.port_of(daemon, url), client)
        client.transport.write(b"ping")
        client.transport.loseWriteConnection()
        await client.lost
        self.assertEqual(client.received, b"ping")

    async def polls(self, daemon: Daemon, count: int) -> None:
        """
        Wait until C{count} more polls have succeeded.
        """
        for _ in range(count):
            await self.next_poll(daemon)

    async def next_poll(self, daemon: Daemon) -> None:
        since = daemon.discovery.last_success or 0.0
        await wait_until(
            lambda: (daemon.discovery.last_success or 0.0) > since, "a good poll"
        )

    def logged(self, text: str) -> list[str]:
        return [line for line in map(formatEvent, self.events) if text in line]

    def assertNotShown(self, *secrets: str) -> None:
        for event in self.events:
            text = formatEvent(event) + repr(event.get("log_failure", ""))
            for secret in secrets:
                self.assertNotIn(secret, text)

    async def survive(
        self,
        inject: Callable[[Daemon], object],
        failures: int = 2,
        repair: Callable[[Daemon], object] = lambda daemon: None,
        config: Config | None = None,
        after: Callable[[Daemon], object] = lambda daemon: None,
    ) -> None:
        """
        Start a daemon, C{inject} a fault, and check that while C{failures}
        polls fail nothing is torn down, rebound or rewritten, traffic
        flows, and the failure and the recovery (after C{repair}) are
        logged once each; then check C{after}.
        """
        daemon = await self.start_daemon(config)
        await self.polls(daemon, 1)
        ports, files = self.ports(daemon), self.state_files(daemon)
        inject(daemon)
        await wait_until(
            lambda: daemon.discovery.failures >= failures, f"{failures} failed polls"
        )
        self.assertEqual(self.ports(daemon), ports)
        await self.echo(daemon)
        repair(daemon)
        daemon.discovery.poll_now()  # rather than wait out the backoff
        await wait_until(lambda: daemon.discovery.failures == 0, "a good poll")
        await self.polls(daemon, 1)
        self.assertEqual(self.ports(daemon), ports)
        self.assertEqual(self.state_files(daemon), files)
        self.assertEqual(len(self.logged(POLL_FAILED)), 1)
        self.assertEqual(len(self.logged(POLL_RECOVERED)), 1)
        self.assertEqual(self.listening(daemon), 2)
        after(daemon)


class FailedPollTests(ReconcileEndToEnd):
    """
    A failed poll changes nothing, whatever the failure.
    """

    def test_serverError(self) -> Deferred[None]:
        """
        5xx answers.
        """
        return ensureDeferred(
            self.survive(
                lambda d: self.cloud.faults.next_status(
                    503, count=3, path_contains="bound_endpoints"
                ),
                failures=3,
            )
        )

    def test_connectionRefused(self) -> Deferred[None]:
        """
        The API port closed: connections are refused.
        """
        api_port, api_tls = self.devcloud._ports[1], self.devcloud._api_tls
        address = self.devcloud.api_address

        def close(daemon: Daemon) -> None:
            api_port.stopListening()
            api_tls.close_connections()

        def reopen(daemon: Daemon) -> None:
            tls = cast(ServerFactory[Any], api_tls)
            port = reactor.listenTCP(address[1], tls, interface=address[0])
            self.addCleanup(port.stopListening)

        async def run() -> None:
            await self.survive(close, failures=1, repair=reopen)
            self.assertTrue(self.logged("Connection was refused"))

        return ensureDeferred(run())

    def test_timeout(self) -> Deferred[None]:
        """
        An API slower than the client's timeout.
        """

        async def run() -> None:
            await self.survive(
                lambda d: self.cloud.faults.next_delay(
                    3.0, path_contains="bound_endpoints"
                ),
                failures=1,
                config=self.config(timeout=0.3),
            )
            self.assertTrue(self.logged("no answer in time"))

        return ensureDeferred(run())

    def test_wrongKey(self) -> Deferred[None]:
        """
        A key ngrok no longer accepts (403): reported without the key, which
        ngrok quotes back.
        """
        key = self.devcloud.api_key

        async def run() -> None:
            await self.survive(
                lambda d: self.cloud.api_keys.discard(key),
                repair=lambda d: self.cloud.api_keys.add(key),
            )
            self.assertTrue(self.logged("ERR_NGROK_202"))
            self.assertNotShown(key)

        return ensureDeferred(run())

    def test_unauthorized(self) -> Deferred[None]:
        """
        401 answers.
        """
        return ensureDeferred(
            self.survive(
                lambda d: self.cloud.faults.next_status(
                    401, count=2, path_contains="bound_endpoints"
                )
            )
        )

    def test_notFound(self) -> Deferred[None]:
        """
        A 404 for the listing while the operator exists is no deletion.
        """

        def registered(daemon: Daemon) -> None:
            self.assertEqual(daemon.identity_service.state, REGISTERED)

        return ensureDeferred(
            self.survive(
                lambda d: self.cloud.faults.next_status(
                    404, count=2, path_contains="bound_endpoints"
                ),
                after=registered,
            )
        )

    def test_retryAfter(self) -> Deferred[None]:
        """
        A 429's C{Retry-After} is waited before the next poll.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            self.cloud.faults.next_status(
                429, retry_after=2, path_contains="bound_endpoints"
            )
            await wait_until(lambda: daemon.discovery.failures == 1, "a 429")
            next_poll = daemon.discovery.next_poll_at
            assert next_poll is not None
            self.assertGreater(next_poll - reactor.seconds(), 1.5)
            daemon.discovery.poll_now()
            await wait_until(lambda: daemon.discovery.failures == 0, "a good poll")
            self.assertEqual(self.listening(daemon), 2)

        return ensureDeferred(run())

    def test_invalidJSON(self) -> Deferred[None]:
        """
        An answer that is not JSON.
        """
        return ensureDeferred(
            self.survive(
                lambda d: self.cloud.faults.next_body(
                    b'{"endpoints": [', count=2, path_contains="bound_endpoints"
                )
            )
        )

    def test_wrongShape(self) -> Deferred[None]:
        """
        JSON that is not a listing of endpoints.
        """
        return ensureDeferred(
            self.survive(
                lambda d: self.cloud.faults.next_body(
                    b'{"endpoints": {"id": 1}}', count=2, path_contains="bound"
                )
            )
        )

    def test_pageLoop(self) -> Deferred[None]:
        """
        A next page that names a page already read.
        """

        def loop(daemon: Daemon) -> None:
            self.cloud.faults.page_loop = True

        def unloop(daemon: Daemon) -> None:
            self.cloud.faults.page_loop = False

        async def run() -> None:
            await self.survive(loop, repair=unloop)
            self.assertTrue(self.logged("a loop"))

        return ensureDeferred(run())

    def test_noBindingsFeature(self) -> Deferred[None]:
        """
        ERR_NGROK_19002 says that the account lacks the bindings feature.
        """
        body = json.dumps(
            {
                "error_code": "ERR_NGROK_19002",
                "status_code": 400,
                "msg": "Kubernetes Operators and Bindings not enabled",
            }
        ).encode()

        async def run() -> None:
            await self.survive(
                lambda d: self.cloud.faults.next_body(
                    body, status=400, count=2, path_contains="bound_endpoints"
                )
            )
            self.assertTrue(self.logged("does not have the Kubernetes Operators"))

        return ensureDeferred(run())


class HostileAnswerTests(ReconcileEndToEnd):
    """
    Answers beyond the API client's limits fail the poll with an error that
    names the limit, and the last good endpoints stay served.
    """

    def test_hugeBody(self) -> Deferred[None]:
        """
        A body larger than the client reads.
        """
        body = b'{"endpoints": [], "pad": "' + b"x" * MAX_BODY + b'"}'

        async def run() -> None:
            await self.survive(
                lambda d: self.cloud.faults.next_body(
                    body, count=2, path_contains="bound_endpoints"
                )
            )
            self.assertTrue(self.logged(f"larger than {MAX_BODY} bytes"))

        return ensureDeferred(run())

    def test_hugeString(self) -> Deferred[None]:
        """
        A 70 kB endpoint URL.
        """
        extra: dict[str, object] = {
            "id": "ep_huge",
            "url": f"tcp://{'a' * 70_000}.test:1",
        }

        async def run() -> None:
            await self.survive(
                lambda d: self.cloud.faults.extra_endpoints.append(extra),
                repair=lambda d: self.cloud.faults.extra_endpoints.clear(),
            )
            (line,) = self.logged(POLL_FAILED)
            self.assertIn(f"longer than {MAX_STRING} characters", line)
            self.assertLess(len(line), 1000)

        return ensureDeferred(run())

    def test_tooManyEndpoints(self) -> Deferred[None]:
        """
        More endpoints than C{bound_endpoints.max_endpoints}.
        """
        extra: list[dict[str, object]] = [
            {"id": f"ep_{n}", "url": f"tcp://e{n}.test:1"} for n in range(3)
        ]
        config = self.config()
        config = attrs.evolve(
            config,
            bound_endpoints=attrs.evolve(config.bound_endpoints, max_endpoints=4),
        )

        async def run() -> None:
            await self.survive(
                lambda d: self.cloud.faults.extra_endpoints.extend(extra),
                repair=lambda d: self.cloud.faults.extra_endpoints.clear(),
                config=config,
            )
            self.assertTrue(self.logged("more than 4 endpoints"))

        return ensureDeferred(run())

    def test_slowListing(self) -> Deferred[None]:
        """
        Pages that each come within C{api.timeout}, but not the whole
        listing within C{bound_endpoints.poll_timeout}.
        """
        config = self.config(timeout=2.0)
        config = attrs.evolve(
            config,
            bound_endpoints=attrs.evolve(config.bound_endpoints, poll_timeout=0.5),
        )

        def slow(daemon: Daemon) -> None:
            self.cloud.page_size = 1
            self.cloud.faults.next_delay(0.3, count=6, path_contains="bound")

        def fast(daemon: Daemon) -> None:
            self.cloud.page_size = 100
            self.cloud.faults = Faults()

        async def run() -> None:
            await self.survive(slow, failures=1, repair=fast, config=config)
            self.assertTrue(self.logged("did not end within 0.5s"))

        return ensureDeferred(run())


class RestartDuringOutageTests(ReconcileEndToEnd):
    """
    A restart while the API is down serves the endpoints of the last good
    poll, marked stale, until the API answers.
    """

    def test_servedStaleUntilTheAPIAnswers(self) -> Deferred[None]:
        async def run() -> None:
            daemon = await self.start_daemon()
            await self.polls(daemon, 1)
            self.assertFalse(any(row.stale for row in daemon.endpoint_status()))
            await daemon.stopService()
            self.cloud.faults.next_status(503, count=10_000)
            again = await self.start_daemon()
            rows = again.endpoint_status()
            self.assertEqual([row.stale for row in rows], [True, True])
            self.assertEqual({row.state for row in rows}, {LISTENING})
            await self.echo(again)
            self.assertEqual(len(self.logged("serving the 2 endpoints of the last")), 1)
            self.assertEqual(again.discovery.last_success, None)
            self.cloud.faults = Faults()
            again.discovery.poll_now()
            await self.next_poll(again)
            self.assertEqual(
                [row.stale for row in again.endpoint_status()], [False] * 2
            )

        return ensureDeferred(run())

    def test_otherOperatorsListNotServed(self) -> Deferred[None]:
        """
        The list kept for another operator is not served.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            await self.polls(daemon, 1)
            await daemon.stopService()
            state_dir = daemon.config.server.state_dir
            kept = lastgood.load(state_dir)
            assert kept is not None
            lastgood.save(state_dir, "k8sop_other", kept[1])
            self.cloud.faults.next_status(503, count=10_000)
            again = await self.start_daemon(expected=0)
            await wait_until(lambda: again.discovery.failures >= 2, "failed polls")
            self.assertEqual(again.endpoint_status(), ())
            self.assertEqual(self.listening(again), 0)

        return ensureDeferred(run())


class StopTests(ReconcileEndToEnd):
    """
    A stop is bounded as a whole.
    """

    def test_stuckStopCut(self) -> Deferred[None]:
        """
        A part of the daemon that never finishes stopping delays the stop by
        at most the stop timeout; the stop says so, and the state directory
        is free again.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            self.patch(daemon_module, "STOP_TIMEOUT", 0.5)
            stuck: Deferred[None] = Deferred()
            daemon.hosts.stopService = lambda: stuck  # type: ignore[method-assign]
            started = reactor.seconds()
            await daemon.stopService()
            self.assertLess(reactor.seconds() - started, 10)
            self.assertEqual(len(self.logged("stopping took longer than 0.5s")), 1)
            lock = StateLock(daemon.config.server.state_dir)
            self.assertRaises(StateDirectoryLocked, lock.acquire)
            stuck.callback(None)
            await wait_until(lambda: not daemon.state_lock.held, "the rest")
            lock.acquire()
            lock.release()

        return ensureDeferred(run())


class EndpointChangeTests(ReconcileEndToEnd):
    """
    What a poll with changed (or unchanged) endpoints does.
    """

    def test_unchangedNotTouched(self) -> Deferred[None]:
        """
        Polls with no change rebind nothing and rewrite no file; an added
        endpoint gets a listener without touching the others, and a removed
        one loses only its own.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            ports, files = self.ports(daemon), self.state_files(daemon)
            await self.polls(daemon, 3)
            self.assertEqual(self.ports(daemon), ports)
            self.assertEqual(self.state_files(daemon), files)
            self.assertEqual(len(self.logged("listening for")), 2)
            self.cloud.add_endpoint("tcp://new.test:7002", ("127.0.0.1", 1))
            await wait_until(lambda: self.listening(daemon) == 3, "3 listeners")
            self.assertEqual(
                {k: v for k, v in self.ports(daemon).items() if k in ports}, ports
            )
            self.cloud.remove_endpoint(OTHER)
            await wait_until(lambda: self.listening(daemon) == 2, "2 listeners")
            self.assertEqual(
                self.ports(daemon)[parse_endpoint_url(ECHO).url],
                ports[parse_endpoint_url(ECHO).url],
            )
            await self.echo(daemon)

        return ensureDeferred(run())

    def test_urlChangedUnderSameId(self) -> Deferred[None]:
        """
        An endpoint whose URL changes under the same id is planned again:
        its old listener goes, its new one comes, the others stay.
        """

        async def run() -> None:
            moving: dict[str, object] = {
                "id": "ep_moving",
                "url": "tcp://moving.test:7100",
            }
            self.cloud.faults.extra_endpoints.append(moving)
            daemon = await self.start_daemon(expected=3)
            ports = self.ports(daemon)
            moving["url"] = "tcp://moving.test:7200"
            new, old = (
                parse_endpoint_url(f"tcp://moving.test:{port}").url
                for port in (7200, 7100)
            )
            await wait_until(
                lambda: new in daemon.listeners.listeners, "the moved endpoint"
            )
            self.assertNotIn(old, daemon.listeners.listeners)
            self.assertEqual(daemon.endpoints["ep_moving"].url, moving["url"])
            for url in (ECHO, OTHER):
                key = parse_endpoint_url(url).url
                self.assertIs(self.ports(daemon)[key], ports[key])

        return ensureDeferred(run())

    def test_unparseableEndpointSkipped(self) -> Deferred[None]:
        """
        An endpoint whose URL cannot be served is skipped with one warning
        naming it, shown as failed, and the others are served.
        """

        async def run() -> None:
            self.cloud.faults.extra_endpoints.append(
                {"id": "ep_bad", "url": "tcp://noport.test", "proto": "tcp"}
            )
            daemon = await self.start_daemon()
            await self.polls(daemon, 3)
            (warning,) = self.logged("skipping endpoint ep_bad")
            self.assertIn("tcp://noport.test", warning)
            rows = {row.id: row for row in daemon.endpoint_status()}
            self.assertEqual(rows["ep_bad"].state, FAILED)
            self.assertIn("must give its port", rows["ep_bad"].reason)
            await self.echo(daemon)

        return ensureDeferred(run())

    def test_releasedPortHeldBack(self) -> Deferred[None]:
        """
        A port given up in a poll does not go to an endpoint new in the
        same poll, nor after a restart; the line that says it stopped
        listening names the endpoint.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            released = self.port_of(daemon, OTHER)
            self.cloud.remove_endpoint(OTHER)
            self.cloud.add_endpoint(
                "tcp://new.test:7002", ("127.0.0.1", self.echo_port)
            )
            new = parse_endpoint_url("tcp://new.test:7002").url
            await wait_until(
                lambda: (
                    new in daemon.listeners.listeners
                    and parse_endpoint_url(OTHER).url not in daemon.listeners.listeners
                ),
                "the new endpoint",
            )
            self.assertNotEqual(self.port_of(daemon, "tcp://new.test:7002"), released)
            self.assertEqual(
                len(
                    self.logged(
                        f"stopped listening for {parse_endpoint_url(OTHER).url}"
                    )
                ),
                1,
            )
            await daemon.stopService()
            self.cloud.add_endpoint(
                "tcp://newer.test:7003", ("127.0.0.1", self.echo_port)
            )
            again = await self.start_daemon(expected=3)
            ports = {
                self.port_of(again, url) for url in ("tcp://newer.test:7003", ECHO)
            }
            self.assertNotIn(released, ports)
            self.assertIn(
                released,
                {port for port, _ in again.allocations.released_ports.values()},
            )

        return ensureDeferred(run())

    def test_hostileHostnamesSkipped(self) -> Deferred[None]:
        """
        A hostname holding a space (which would add a second name to its
        hosts line) or too long for DNS gets no listener and one warning
        each; a name of another shape than C{service.namespace} is served.
        """

        async def run() -> None:
            self.cloud.add_endpoint(
                "tcp://controller.example.com:7002", ("127.0.0.1", self.echo_port)
            )
            self.cloud.faults.extra_endpoints.extend(
                [
                    {"id": "ep_space", "url": "tcp://x victim.example:7003"},
                    {"id": "ep_long", "url": f"tcp://{'a' * 300}.example:7004"},
                ]
            )
            daemon = await self.start_daemon(expected=3)
            await self.polls(daemon, 3)
            self.assertEqual(len(self.logged("skipping endpoint ep_space")), 1)
            self.assertEqual(len(self.logged("skipping endpoint ep_long")), 1)
            rows = {row.id: row for row in daemon.endpoint_status()}
            for id, reason in [("ep_space", "whitespace"), ("ep_long", "DNS name")]:
                self.assertEqual(rows[id].state, FAILED)
                self.assertIn(reason, rows[id].reason)
            self.assertEqual(self.listening(daemon), 3)
            await self.echo(daemon, "tcp://controller.example.com:7002")

        return ensureDeferred(run())

    def test_failedEndpointVisibleAndRetried(self) -> Deferred[None]:
        """
        An endpoint whose port is taken is shown as failed with the reason,
        the others are served, and it listens once the port is free again.
        """

        async def run() -> None:
            blocker = reactor.listenTCP(
                self.start_port, ServerFactory(), interface="127.0.0.1"
            )
            self.addCleanup(blocker.stopListening)
            daemon = await self.start_daemon(expected=1)

            def rows() -> dict[str, EndpointStatus]:
                return {row.url: row for row in daemon.endpoint_status()}

            await wait_until(lambda: rows()[ECHO].state == FAILED, "the failure")
            table = rows()
            self.assertIn("already in use", table[ECHO].reason)
            self.assertEqual(table[ECHO].listen_address, f"127.0.0.1:{self.start_port}")
            self.assertEqual(table[OTHER].state, LISTENING)
            await self.echo(daemon, OTHER)
            await maybeDeferred(blocker.stopListening)
            await wait_until(lambda: self.listening(daemon) == 2, "the retried bind")
            await self.echo(daemon)
            row = rows()[ECHO]
            self.assertEqual(
                (row.state, row.listen_address, row.connections_total, row.bytes_up),
                (LISTENING, f"127.0.0.1:{self.start_port}", 1, 4),
            )

        return ensureDeferred(run())


class IPv6NetworkModeTests(ReconcileEndToEnd):
    """
    Network mode on an IPv6 address.
    """

    def test_listensOnIPv6(self) -> Deferred[None]:
        """
        With net.listen_interface ::1, every endpoint listens there, its
        status row tells local clients [::1]:PORT, and bytes go through the
        ingress to the backend.
        """

        async def run() -> None:
            config = self.config()
            config = attrs.evolve(
                config, net=attrs.evolve(config.net, listen_interface="::1")
            )
            daemon = await self.start_daemon(config)
            port = self.port_of(daemon, ECHO)
            row = {row.url: row for row in daemon.endpoint_status()}[ECHO]
            self.assertEqual(
                (row.client_address, row.listen_address, row.mode, row.addresses),
                (f"[::1]:{port}", f"[::1]:{port}", "::1", ("::1",)),
            )
            client = Recorder()
            await connectProtocol(TCP6ClientEndpoint(reactor, "::1", port), client)
            client.transport.write(b"over IPv6")
            client.transport.loseWriteConnection()
            await client.lost
            self.assertEqual(client.received, b"over IPv6")
            self.assertEqual(
                len(self.logged(f"listening for {ECHO} on [::1]:{port}")), 1
            )

        return ensureDeferred(run())


class IdentityTests(ReconcileEndToEnd):
    """
    The API key and the certificate change under a running daemon.
    """

    def test_noKeyThenKey(self) -> Deferred[None]:
        """
        Without a key the daemon runs and waits; a wrong key is refused and
        changes nothing; the right one registers and the endpoints are
        served. No key ever appears in the log.
        """

        async def run() -> None:
            daemon = await self.start_daemon(self.config(key=""), expected=0)
            # Once the identity files are read, in their thread.
            await wait_until(
                lambda: daemon.identity_service.state == WAITING_FOR_KEY,
                "waiting for an API key",
            )
            self.assertEqual(self.cloud.operators(), [])
            with self.assertRaises(APIError) as refused:
                await daemon.set_api_key("not-the-key")
            self.assertIn("ERR_NGROK_202", str(refused.exception))
            self.assertNotIn("not-the-key", str(refused.exception))
            self.assertEqual(daemon.api_key, "")
            self.assertFalse(os.path.exists(daemon.config.server.client_key))
            await daemon.set_api_key(self.devcloud.api_key)
            await wait_until(lambda: self.listening(daemon) == 2, "2 listeners")
            self.assertEqual(len(self.cloud.operators()), 1)
            await self.echo(daemon)
            self.assertNotShown(self.devcloud.api_key, "not-the-key")

        return ensureDeferred(run())

    def test_keyRotation(self) -> Deferred[None]:
        """
        When ngrok stops accepting the key, polls fail (once in the log) and
        nothing is torn down; a new key of the same account is tried, then
        used from the next request on. A key of another account is refused.
        """

        async def run() -> None:
            old, new = self.devcloud.api_key, "rotated-key-8d2f"
            daemon = await self.start_daemon()
            ports = self.ports(daemon)
            self.cloud.api_keys = {new}
            await wait_until(lambda: daemon.discovery.failures >= 2, "failed polls")
            await self.assertFailure(daemon.set_api_key("stranger"), APIError)
            self.assertEqual(daemon.api_key, old)
            await daemon.set_api_key(new)
            self.assertEqual(daemon.api_key, new)
            await wait_until(lambda: daemon.discovery.failures == 0, "a good poll")
            self.assertEqual(self.ports(daemon), ports)
            self.assertEqual(len(self.logged(POLL_FAILED)), 1)
            self.assertNotShown(old, new, "stranger")

        return ensureDeferred(run())

    def test_renewalUnderOpenConnection(self) -> Deferred[None]:
        """
        Renewing the certificate keeps an open connection flowing; new
        connections present the new certificate to the ingress.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            old = daemon.identity
            assert old is not None
            client = Recorder()
            await connect(self.port_of(daemon, ECHO), client)
            client.transport.write(b"before ")
            await wait_until(lambda: client.received == b"before ", "the echo")
            (carrying,) = self.devcloud.ingress.carrying
            self.assertEqual(
                carrying.transport.getPeerCertificate().get_serial_number(),
                _serial(old.cert_pem),
            )
            renewed = await daemon.identity_service.renew_now()
            self.assertNotEqual(_serial(renewed.cert_pem), _serial(old.cert_pem))
            client.transport.write(b"after")
            await wait_until(lambda: client.received == b"before after", "the echo")
            second = Recorder()
            await connect(self.port_of(daemon, ECHO), second)
            second.transport.write(b"new")
            await wait_until(lambda: second.received == b"new", "the echo")
            (newer,) = self.devcloud.ingress.carrying - {carrying}
            serial = newer.transport.getPeerCertificate().get_serial_number()
            self.assertEqual(serial, _serial(renewed.cert_pem))
            operator = self.cloud.operator_for_serial(serial)
            assert operator is not None
            self.assertEqual(operator.id, old.operator_id)
            for each in (client, second):
                each.transport.loseConnection()
                await each.lost

        return ensureDeferred(run())

    def test_keyReadableByOthers(self) -> Deferred[None]:
        """
        A client key that group or others can read is said at start, naming
        the file and its mode; the key written at registration is 0600.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            await daemon.stopService()
            key = daemon.config.server.client_key
            self.assertEqual(self.logged("is readable by group or others"), [])
            os.chmod(key, 0o640)
            await self.start_daemon()
            (line,) = self.logged("is readable by group or others")
            self.assertIn(f"{key} is readable by group or others (mode 0640)", line)

        return ensureDeferred(run())

    def test_restartReuses(self) -> Deferred[None]:
        """
        A restart after a renewal uses the renewed identity and the same
        ports, and registers nothing.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            renewed = await daemon.identity_service.renew_now()
            ports = {url: self.port_of(daemon, url) for url in (ECHO, OTHER)}
            await daemon.stopService()
            again = await self.start_daemon()
            assert again.identity is not None
            self.assertEqual(again.identity.key_pem, renewed.key_pem)
            self.assertEqual(len(self.cloud.operators()), 1)
            self.assertEqual(
                {url: self.port_of(again, url) for url in (ECHO, OTHER)}, ports
            )
            await self.echo(again)

        return ensureDeferred(run())

    def test_operatorDeleted(self) -> Deferred[None]:
        """
        An operator deleted in the dashboard is reported, once, with what to
        do; the listeners stay, and nothing is registered.
        """

        async def run() -> None:
            daemon = await self.start_daemon()
            ports = self.ports(daemon)
            self.cloud.delete_operator(daemon.identity_service.status().operator_id)
            await wait_until(
                lambda: daemon.identity_service.state == OPERATOR_DELETED,
                "the deletion noticed",
            )
            await wait_until(lambda: daemon.discovery.failures >= 3, "failed polls")
            self.assertIn(
                "api.reregister_if_deleted", daemon.identity_service.status().error
            )
            self.assertEqual(self.cloud.operators(), [])
            self.assertEqual(self.ports(daemon), ports)
            self.assertEqual(len(self.logged("was it deleted in the dashboard")), 1)

        return ensureDeferred(run())

    def test_operatorDeletedReregisters(self) -> Deferred[None]:
        """
        With C{api.reregister_if_deleted}, a new operator replaces a deleted
        one and its endpoints are served through the same listeners.
        """

        async def run() -> None:
            daemon = await self.start_daemon(self.config(reregister_if_deleted=True))
            ports = self.ports(daemon)
            old = daemon.identity_service.status().operator_id
            self.cloud.delete_operator(old)
            await wait_until(
                lambda: [o.id for o in self.cloud.operators()] not in ([], [old]),
                "a new operator",
            )
            await wait_until(lambda: daemon.discovery.failures == 0, "a good poll")
            self.assertEqual(self.ports(daemon), ports)
            await self.echo(daemon)

        return ensureDeferred(run())
