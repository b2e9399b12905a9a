"""
Tests for L{ngrokd.daemon.Daemon.reconcile} with the network pieces in
memory: the order in which addresses, listeners and names are set up and
torn down, what fails and what keeps working, and that reconciles never
overlap. Also the listen-mode decisions of L{ngrokd.plan} they rely on.
"""

from __future__ import annotations

import datetime
import errno
import os
import time
from collections.abc import Set
from ipaddress import ip_address, ip_network
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.applier import ROWS_AT_ONCE
from ngrokd.config import load_config
from ngrokd.control.controller import Controller
from ngrokd.control.feed import EventFeed
from ngrokd.control.health import readiness_text, status_document
from ngrokd.control.metrics import DaemonMetrics
from ngrokd.control.notify import wants_ready
from ngrokd.control.page import render_daemon
from ngrokd.control.render import status_lines
from ngrokd.daemon import Daemon
from ngrokd.endpoints import BoundEndpoint, parse_endpoint_url
from ngrokd.host.allocation import IP6_MAPPINGS, IP_MAPPINGS, NETWORK_PORTS
from ngrokd.host.hostsection import BEGIN, END
from ngrokd.host.netif import NotPermitted
from ngrokd.host.netif.memory import MemoryInterface
from ngrokd.ngrok.api import ApiEndpoint
from ngrokd.ngrok.identity import Identity
from ngrokd.ngrok.identity_service import REGISTERED, WAITING_FOR_KEY
from ngrokd.ngrok.lastgood import LAST_GOOD
from ngrokd.plan import client_address, plan, uses_virtual
from ngrokd.registration import Registration
from ngrokd.status import FAILED, LISTENING
from ngrokd.stopping import Stopper
from ngrokd.test.test_hosts import ThreadReactor
from ngrokd.test.test_netif import SynchronousThreadPool

A = ip_address("10.107.0.2")
B = ip_address("10.107.0.3")
SUBNET6 = "fd6e:6772:6f6b::/64"
A6 = ip_address("fd6e:6772:6f6b::2")


class Recorder:
    """
    One list of what the network pieces did, in order.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def kinds(self) -> list[str]:
        return [event[0] for event in self.events]


class RecordingInterface(MemoryInterface):
    """
    A memory interface that records each change and can be held mid-change.
    """

    def __init__(self, recorder: Recorder, subnet6: Any = None) -> None:
        super().__init__(ip_network("10.107.0.0/24"), subnet6=subnet6)
        self.recorder = recorder
        self.gate: Deferred[None] | None = None
        self.refused: set[Any] = set()

    def ensure_addresses(self, addresses: Set[Any]) -> Deferred[None]:
        self.recorder.events.append(("addresses", frozenset(addresses)))
        if self.refused & set(addresses):
            allowed = set(addresses) - self.refused
            self.present = allowed
            refused = ", ".join(sorted(str(ip) for ip in self.refused))
            return Deferred.fromCoroutine(_raise(NotPermitted(f"add {refused}")))
        done = super().ensure_addresses(addresses)
        if self.gate is not None:
            gate, self.gate = self.gate, None
            return gate.addCallback(lambda _: done)
        return done

    def destroy(self) -> Deferred[None]:
        self.recorder.events.append(("destroy",))
        return super().destroy()


async def _raise(error: Exception) -> None:
    raise error


class Port:
    def __init__(self, recorder: Recorder, interface: str, port: int) -> None:
        self.recorder, self.interface, self.port = recorder, interface, port

    def stopListening(self) -> None:
        self.recorder.events.append(("stop", self.interface, self.port))


class NetworkReactor(ThreadReactor):
    """
    A memory reactor whose listens are recorded (and refused with
    EADDRINUSE on the binds in C{taken}), and whose threads are this one.
    """

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder
        self.taken: set[tuple[str, int]] = set()

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        if (interface, port) in self.taken:
            raise CannotListenError(
                interface, port, OSError(errno.EADDRINUSE, "Address in use")
            )
        self.recorder.events.append(("listen", interface, port))
        return Port(self.recorder, interface, port)


def _at_once(name: str) -> SynchronousThreadPool:
    """
    The daemon's file thread, as this one: nothing here runs a reactor.
    """
    return SynchronousThreadPool(0, 1, name)


def _endpoints(*urls: str) -> list[ApiEndpoint]:
    return [ApiEndpoint(f"ep_{url}", url, "") for url in urls]


class ReconcileFixture(SynchronousTestCase):
    """
    A daemon whose network pieces are in memory, its hosts file a real file.
    """

    def make_daemon(
        self,
        listen_interface: str = "virtual",
        overrides: str = "{}",
        interface_failure: Exception | None = None,
        subnet6: str = "",
    ) -> Daemon:
        """
        @param subnet6: C{net.subnet6}; by default none (IPv4 alone).
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.state_dir = os.path.join(base, "state")
        self.hosts_path = os.path.join(base, "hosts")
        with open(self.hosts_path, "w") as f:
            f.write("127.0.0.1\tlocalhost\n")
        config_path = os.path.join(base, "config.yml")
        with open(config_path, "w") as f:
            f.write(
                f"server:\n  state_dir: {self.state_dir}\n"
                # The names go to the hosts file alone: the DNS server and
                # its registration have tests of their own.
                "dns:\n  mode: 'off'\n"
                f"net:\n  listen_interface: {listen_interface!r}\n"
                f"  subnet: 10.107.0.0/24\n  start_port: 9080\n"
                f"  hosts_file: {self.hosts_path}\n  overrides: {overrides}\n"
                f"  subnet6: {subnet6!r}\n"
            )
        config = load_config(config_path, environ={}).config
        self.recorder = Recorder()
        self.reactor = NetworkReactor(self.recorder)
        self.interface = RecordingInterface(
            self.recorder, ip_network(subnet6) if subnet6 else None
        )
        self.interface.failure = interface_failure
        daemon = Daemon(config, self.reactor, self.interface, threadpool=_at_once)
        real_write = daemon.hosts.file.write

        def write(mapping: Any) -> bool:
            self.recorder.events.append(("hosts", dict(mapping)))
            return real_write(mapping)

        daemon.hosts.file.write = write  # type: ignore[method-assign]
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)
        daemon.startService()
        self.addCleanup(daemon.stopService)
        del self.recorder.events[:]
        return daemon

    def registered(self, daemon: Daemon, not_after: float = 4102444800.0) -> None:
        """
        Give C{daemon} an identity valid until C{not_after}.
        """
        when = datetime.datetime.fromtimestamp(not_after, datetime.UTC)
        identity = Identity("k8sop_1", b"", b"", when, when)
        daemon.identity_service.identity = identity
        daemon.identity_service.state = REGISTERED

    def reconcile(self, daemon: Daemon, *urls: str) -> None:
        self.applied(daemon.reconcile(_endpoints(*urls)))

    def applied(self, reconciling: Deferred[None]) -> None:
        """
        Wait for a reconcile, turning the reactor while it lets others run
        (many binds are made a few milliseconds at a time).
        """
        for _ in range(10_000):
            if reconciling.called:
                break
            self.reactor.advance(0)
        self.successResultOf(reconciling)

    def hosts(self) -> str:
        with open(self.hosts_path) as f:
            return f.read()

    def assertGivenUp(self, gone: Any, kept: str, kept_address: Any) -> None:
        """
        The recorded changes gave up the port 80 listener on C{gone}, then
        its name (only C{kept} is named), then its address, in that order.
        """
        self.assertEqual(
            self.recorder.events,
            [
                ("addresses", frozenset({gone, kept_address})),
                ("stop", str(gone), 80),
                ("hosts", {kept: (kept_address,)}),
                ("addresses", frozenset({kept_address})),
            ],
        )


class ReconcileTests(ReconcileFixture):
    """
    A reconcile sets up an endpoint's address, then its listener, then its
    name, and takes them away in the opposite order, only when no endpoint
    of the hostname is left.
    """

    def test_addressThenListenersThenName(self) -> None:
        """
        A new hostname gets its address first, then its listeners (every
        port of it on that one address), then its line in the hosts file.
        """
        daemon = self.make_daemon()
        self.reconcile(daemon, "http://a.test", "tcp://a.test:5432")
        self.assertEqual(
            self.recorder.events,
            [
                ("addresses", frozenset({A})),
                ("listen", "10.107.0.2", 80),
                ("listen", "10.107.0.2", 5432),
                ("hosts", {"a.test": (A,)}),
            ],
        )
        self.assertIn(f"{BEGIN}\n10.107.0.2\ta.test\n", self.hosts())

    def test_sharedHostnameKeepsItsAddress(self) -> None:
        """
        Removing one of two endpoints of a hostname stops only its listener:
        the address and the name stay for the other.
        """
        daemon = self.make_daemon()
        self.reconcile(daemon, "http://a.test", "tcp://a.test:5432")
        names = self.hosts()
        del self.recorder.events[:]
        self.reconcile(daemon, "http://a.test")
        self.assertEqual(
            self.recorder.events,
            [
                ("addresses", frozenset({A})),
                ("stop", "10.107.0.2", 5432),
                ("hosts", {"a.test": (A,)}),
            ],
        )
        self.assertEqual(self.interface.present, {A})
        self.assertEqual(self.hosts(), names)
        self.assertIn("10.107.0.2\ta.test\n", names)

    def test_releasedInReverse(self) -> None:
        """
        When the last endpoint of a hostname goes, its listener stops, then
        its name goes, then its address.
        """
        daemon = self.make_daemon()
        self.reconcile(daemon, "http://a.test", "http://b.test")
        del self.recorder.events[:]
        self.reconcile(daemon, "http://b.test")
        self.assertGivenUp(A, "b.test", B)
        self.assertEqual(self.interface.present, {B})

    def test_stableAcrossRestart(self) -> None:
        """
        Addresses and network ports are saved, and a new daemon on the same
        state directory gives every endpoint the same ones.
        """
        daemon = self.make_daemon(overrides="{n.test: 0.0.0.0}")
        self.reconcile(daemon, "http://b.test", "http://a.test", "tcp://n.test:7")
        specs = {url: spec.bind for url, spec in daemon.plan.specs.items()}
        self.successResultOf(daemon.stopService())
        for name in (IP_MAPPINGS, NETWORK_PORTS):
            self.assertTrue(os.path.exists(os.path.join(self.state_dir, name)))
        again = Daemon(
            daemon.config,
            self.reactor,
            RecordingInterface(self.recorder),
            threadpool=_at_once,
        )
        again.startService()
        self.addCleanup(again.stopService)
        self.successResultOf(
            again.reconcile(
                _endpoints("tcp://n.test:7", "http://a.test", "http://b.test")
            )
        )
        self.assertEqual(
            {url: spec.bind for url, spec in again.plan.specs.items()}, specs
        )
        self.assertEqual(specs["tcp://n.test:7"], ("0.0.0.0", 9080))

    def test_stopTearsDownInReverse(self) -> None:
        """
        A clean stop closes the listeners, then removes the names and the
        interface.
        """
        daemon = self.make_daemon()
        self.reconcile(daemon, "http://a.test")
        del self.recorder.events[:]
        self.successResultOf(daemon.stopService())
        self.assertEqual(
            self.recorder.events,
            [("stop", "10.107.0.2", 80), ("hosts", {}), ("destroy",)],
        )
        self.assertEqual(self.hosts(), "127.0.0.1\tlocalhost\n")

    def test_missingAddressFailsItsEndpoints(self) -> None:
        """
        An address that cannot be set up fails the endpoints that need it,
        with the reason; the other hostnames are served and named.
        """
        daemon = self.make_daemon()
        self.interface.refused = {A}
        self.reconcile(daemon, "http://a.test", "tcp://a.test:5432", "http://b.test")
        self.assertEqual(set(daemon.plan.specs), {"http://b.test:80"})
        for url in ("http://a.test:80", "tcp://a.test:5432"):
            reason = daemon.plan.failures[url]
            self.assertIn("address 10.107.0.2 for a.test could not be set up", reason)
            self.assertIn("root or CAP_NET_ADMIN", reason)
        self.assertIn(("listen", "10.107.0.3", 80), self.recorder.events)
        self.assertEqual(self.recorder.events[-1], ("hosts", {"b.test": (B,)}))

    def test_noPrivilege(self) -> None:
        """
        Without the privilege to make the interface, virtual-mode endpoints
        fail saying what is needed, the log says network mode still works,
        and network-mode endpoints are served.
        """
        daemon = self.make_daemon(
            overrides="{n.test: 127.0.0.1}",
            interface_failure=NotPermitted("create link ngrokd0"),
        )
        self.reconcile(daemon, "http://a.test", "tcp://n.test:7")
        self.reconcile(daemon, "http://a.test", "tcp://n.test:7")
        self.assertIn("root or CAP_NET_ADMIN", daemon.plan.failures["http://a.test:80"])
        self.assertEqual(list(daemon.plan.specs), ["tcp://n.test:7"])
        self.assertIn(("listen", "127.0.0.1", 9080), self.recorder.events)
        errors = [
            formatEvent(e)
            for e in self.events
            if "virtual mode is unavailable" in formatEvent(e)
        ]
        self.assertEqual(len(errors), 1)
        self.assertIn("CAP_NET_ADMIN", errors[0])
        self.assertIn("endpoints in network mode", errors[0])

    def test_portInUse(self) -> None:
        """
        An endpoint whose port is taken is failed with the reason, the other
        endpoints (on the same address too) are served, its name is written,
        and the bind is tried again at the next reconcile.
        """
        daemon = self.make_daemon()
        self.reactor.taken = {("10.107.0.2", 5432)}
        self.reconcile(daemon, "http://a.test", "tcp://a.test:5432")
        listener = daemon.listeners.listeners["tcp://a.test:5432"]
        self.assertFalse(listener.listening)
        self.assertIn("10.107.0.2:5432 is already in use", listener.error)
        self.assertTrue(daemon.listeners.listeners["http://a.test:80"].listening)
        self.assertIn("10.107.0.2\ta.test\n", self.hosts())
        self.reactor.taken = set()
        self.reconcile(daemon, "http://a.test", "tcp://a.test:5432")
        self.assertTrue(listener.listening)

    def test_exhaustion(self) -> None:
        """
        A hostname that finds no free address is failed with the allocator's
        reason; the others are served.
        """
        daemon = self.make_daemon()
        urls = [f"http://h{n:03}.test" for n in range(254)]
        self.reconcile(daemon, *urls)
        self.assertEqual(len(daemon.plan.specs), 253)
        self.assertEqual(
            daemon.plan.failures,
            {
                "http://h253.test:80": "no address left for h253.test: all 253"
                " usable addresses of 10.107.0.0/24 are in use"
            },
        )

    def test_namesNotOursRefused(self) -> None:
        """
        Endpoints whose names are not ngrokd's to claim (localhost, an IP
        literal, the API's and the ingress's hosts, a name the administrator
        set in the hosts file) get no address, no listener and no hosts
        line; each fails with its reason in status, logged once however
        often it is polled, and does not count against readiness; the
        other endpoint is served, and the administrator's line stays.
        """
        daemon = self.make_daemon()
        with open(self.hosts_path, "a") as f:
            f.write("192.0.2.10\tpinned.test\n")
        refused = {
            "http://localhost": "it names this machine itself (RFC 6761)",
            "tcp://192.0.2.77:5432": "it reads as an IP address, not a name",
            "https://api.ngrok.com": "it is the ngrok API's host (api.url),"
            " which ngrokd must reach",
            "tls://kubernetes-binding-ingress.ngrok.io": "it is the binding"
            " ingress's host (ingressEndpoint), which ngrokd must reach",
            "http://pinned.test": "the hosts file sets it outside ngrokd's"
            " section, and that address stays",
        }
        for _ in range(3):
            self.reconcile(daemon, "http://a.test", *refused)
        self.assertEqual(
            [e for e in self.recorder.events if e[0] != "addresses"][:2],
            [("listen", "10.107.0.2", 80), ("hosts", {"a.test": (A,)})],
        )
        self.assertEqual(
            {e for e in self.recorder.events if e[0] == "addresses"},
            {("addresses", frozenset({A}))},
        )
        self.assertEqual(set(daemon.allocations.ips), {"a.test"})
        self.assertEqual(
            self.hosts(),
            f"127.0.0.1\tlocalhost\n192.0.2.10\tpinned.test\n\n{BEGIN}\n"
            f"10.107.0.2\ta.test\n{END}\n",
        )
        rows = {row.url: row for row in daemon.endpoint_status()}
        self.assertEqual(rows["http://a.test"].state, LISTENING)
        for url, why in refused.items():
            host = parse_endpoint_url(url).host
            reason = f"{host} is not ngrokd's to claim: {why}"
            self.assertEqual(
                (rows[url].state, rows[url].reason, rows[url].listen_address),
                (FAILED, reason, ""),
            )
            logged = [
                formatEvent(e)
                for e in self.events
                if formatEvent(e).startswith(f"cannot serve {url}")
            ]
            self.assertEqual(len(logged), 1, url)
        status = daemon.daemon_status()
        self.assertEqual((status.listeners_planned, status.listeners_up), (1, 1))

    def test_pinnedLaterTakesTheNameBack(self) -> None:
        """
        A name the administrator sets in the hosts file while ngrokd serves
        it is given up at the next poll: its listener stops, its line and
        address go, and it fails with the reason; the other name stays.
        """
        daemon = self.make_daemon()
        self.reconcile(daemon, "http://a.test", "http://b.test")
        with open(self.hosts_path, "r+") as f:
            text = f.read()
            f.seek(0)
            f.write("192.0.2.10 b.test\n" + text)
        del self.recorder.events[:]
        self.reconcile(daemon, "http://a.test", "http://b.test")
        self.assertGivenUp(B, "a.test", A)
        self.assertTrue(self.hosts().startswith("192.0.2.10 b.test\n127.0.0.1"))
        self.assertIn(
            "the hosts file sets it outside", daemon.plan.failures["http://b.test:80"]
        )

    def test_allowedDomainsReloaded(self) -> None:
        """
        A reload that sets C{net.allowed_domains} applies at once: names
        outside those domains lose their listener and line, names inside
        keep theirs.
        """
        daemon = self.make_daemon()
        self.reconcile(daemon, "http://a.test", "http://b.prod")
        with open(daemon.config.path, "a") as f:
            f.write("  allowed_domains: [prod]\n")
        del self.recorder.events[:]
        # The config is read in a thread of its own: wait for it, bounded.
        reloaded: list[Any] = []
        daemon.reload().addBoth(reloaded.append)
        deadline = time.monotonic() + 10
        while not reloaded and time.monotonic() < deadline:
            time.sleep(0.01)
        (result,) = reloaded
        self.assertEqual(result.applied, ("net.allowed_domains",))
        self.assertGivenUp(A, "b.prod", B)
        self.assertEqual(
            daemon.plan.failures,
            {
                "http://a.test:80": "a.test is not ngrokd's to claim: it is"
                " outside net.allowed_domains (prod)"
            },
        )

    def test_networkModeWritesNoNames(self) -> None:
        """
        In network mode no name goes to the hosts file (it would not lead to
        the listener); local clients are told to use loopback and the
        network port.
        """
        daemon = self.make_daemon(listen_interface="0.0.0.0")
        self.reconcile(daemon, "http://a.test")
        spec = daemon.plan.specs["http://a.test:80"]
        self.assertEqual(
            (spec.bind, spec.client_address), (("0.0.0.0", 9080), "127.0.0.1:9080")
        )
        self.assertNotIn(BEGIN, self.hosts())
        self.assertFalse(self.interface.created)

    def test_reconcilesDoNotOverlap(self) -> None:
        """
        Results that arrive while one is applied wait; only the latest of
        them is applied, and every caller learns when that is done. (The
        address a.test gave up is held back, so c.test gets the next.)
        """
        daemon = self.make_daemon()
        gate = self.interface.gate = Deferred()
        first = daemon.reconcile(_endpoints("http://a.test"))
        second = daemon.reconcile(_endpoints("http://b.test"))
        third = daemon.reconcile(_endpoints("http://c.test"))
        self.assertEqual(self.recorder.kinds(), ["addresses"])
        for d in (first, second, third):
            self.assertNoResult(d)
        gate.callback(None)
        for d in (first, second, third):
            self.successResultOf(d)
        self.assertEqual(set(daemon.plan.specs), {"http://c.test:80"})
        names = [e[1] for e in self.recorder.events if e[0] == "hosts"]
        self.assertEqual(names, [{"a.test": (A,)}, {"c.test": (B,)}])

    def test_cancelledWaitOnly(self) -> None:
        """
        Cancelling the wait for a reconcile (as a stopping poller does)
        leaves the reconcile running to its end.
        """
        daemon = self.make_daemon()
        gate = self.interface.gate = Deferred()
        waiting = daemon.reconcile(_endpoints("http://a.test"))
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        gate.callback(None)
        self.assertEqual(set(daemon.plan.specs), {"http://a.test:80"})
        self.assertEqual(self.recorder.kinds(), ["addresses", "listen", "hosts"])

    def test_largePollSliced(self) -> None:
        """
        A poll of more than L{ROWS_AT_ONCE} new endpoints is parsed a slice
        at a time, the reactor turning between slices; one of
        L{ROWS_AT_ONCE} is applied without a turn.
        """
        daemon = self.make_daemon()
        small = [ApiEndpoint(f"ep_{i}", "bad://x", "") for i in range(ROWS_AT_ONCE)]
        self.successResultOf(daemon.reconcile(small))
        large = [
            ApiEndpoint(f"ep_new_{i}", "bad://x", "") for i in range(ROWS_AT_ONCE + 1)
        ]
        applying = daemon.reconcile(large)
        self.assertNoResult(applying)
        self.applied(applying)
        self.assertEqual(set(daemon.skipped), {e.id for e in large})

    def test_stuckStopSaysWhatItLeaves(self) -> None:
        """
        A stop that gives up waiting for a part names the names and
        addresses it may leave behind.
        """
        daemon = self.make_daemon()
        self.reconcile(daemon, "http://a.test")
        stuck: Deferred[None] = Deferred()
        daemon.hosts.stopService = lambda: stuck  # type: ignore[method-assign]
        stopper: Stopper = daemon.stopper
        stopped = stopper.stop(5)
        self.assertNoResult(stopped)
        self.reactor.advance(5)
        self.successResultOf(stopped)
        (said,) = [
            formatEvent(e) for e in self.events if "stopping took" in formatEvent(e)
        ]
        self.assertEqual(
            said,
            "stopping took longer than 5s; stopped without waiting for the rest,"
            f" which may leave the names a.test {A} in {self.hosts_path} and the"
            f" addresses {A} (replaced at the next start)",
        )
        stuck.callback(None)

    def test_stopWaitsForReconcile(self) -> None:
        """
        A stop while a reconcile is applied waits for the step under way,
        then tears down; that reconcile starts no listener and writes no
        name once the stop began, and results that arrive after it are
        ignored.
        """
        daemon = self.make_daemon()
        gate = self.interface.gate = Deferred()
        daemon.reconcile(_endpoints("http://a.test"))
        stopping = daemon.stopService()
        self.successResultOf(daemon.reconcile(_endpoints("http://b.test")))
        self.assertNoResult(stopping)
        gate.callback(None)
        self.successResultOf(stopping)
        self.assertEqual(self.recorder.kinds(), ["addresses", "destroy"])


class ReadinessTests(ReconcileFixture):
    """
    Readiness is what is served: every way an endpoint can fail, before it
    is planned or after, holds it back, except what no change on this
    machine would fix; and C{/readyz}, C{ngrokctl health} (the control
    socket's status), C{ngrokd_ready} and systemd agree.
    """

    def readiness(self, daemon: Daemon) -> tuple[bool, str]:
        """
        Whether C{daemon} is ready, as each surface says it, which must
        agree; and what C{/readyz} says.
        """
        status = daemon.daemon_status()
        feed = EventFeed(daemon.daemon_status, daemon.board, self.reactor)
        control = Controller(daemon, feed, self.reactor, "test")
        metrics = DaemonMetrics(daemon).registry.get_sample_value("ngrokd_ready")
        surfaces = [status.ready, control.status()["ready"], metrics == 1.0]
        if status.identity_state != WAITING_FOR_KEY:
            # Waiting for a key, the start is done for systemd all the same;
            # within its first START_WAIT seconds, systemd is told ready
            # exactly when the other surfaces are.
            surfaces.append(wants_ready(status, waited=0.0))
        self.assertEqual(len(set(surfaces)), 1, surfaces)
        return status.ready, readiness_text(status, daemon.endpoint_status())

    def test_ready(self) -> None:
        """
        Registered, polled, every endpoint listening and named: ready.
        """
        daemon = self.make_daemon()
        self.registered(daemon)
        self.reconcile(daemon, "http://a.test", "tcp://b.test:7000")
        self.assertEqual(self.readiness(daemon), (True, "ready\n"))

    def test_virtualModeUnavailable(self) -> None:
        """
        Without the privilege to make the interface, every virtual-mode
        endpoint fails before it is planned: not ready, each named with the
        reason.
        """
        daemon = self.make_daemon(interface_failure=NotPermitted("create link ngrokd0"))
        self.registered(daemon)
        self.reconcile(daemon, "http://a.test", "tcp://b.test:7000")
        ready, text = self.readiness(daemon)
        self.assertFalse(ready)
        lines = text.splitlines()
        self.assertEqual(lines[0], "not ready: 0 of 2 listeners are up")
        self.assertEqual([line.split(":", 1)[0] for line in lines[1:]], ["http", "tcp"])
        self.assertIn("CAP_NET_ADMIN", lines[1])

    def test_addressRefused(self) -> None:
        """
        An address that cannot be set up holds readiness back.
        """
        daemon = self.make_daemon()
        self.registered(daemon)
        self.interface.refused = {A}
        self.reconcile(daemon, "http://a.test", "http://b.test")
        self.assertEqual(
            self.readiness(daemon)[1].splitlines()[0],
            "not ready: 1 of 2 listeners are up",
        )

    def test_subnetFull(self) -> None:
        """
        A hostname that finds no address left holds readiness back.
        """
        daemon = self.make_daemon()
        self.registered(daemon)
        self.reconcile(daemon, *[f"http://h{n:03}.test" for n in range(254)])
        ready, text = self.readiness(daemon)
        self.assertEqual(
            text.splitlines(),
            [
                "not ready: 253 of 254 listeners are up",
                "http://h253.test: no address left for h253.test: all 253 usable"
                " addresses of 10.107.0.0/24 are in use",
            ],
        )

    def test_portInUse(self) -> None:
        """
        A port another program holds holds readiness back.
        """
        daemon = self.make_daemon()
        self.registered(daemon)
        self.reactor.taken = {("10.107.0.2", 5432)}
        self.reconcile(daemon, "http://a.test", "tcp://a.test:5432")
        self.assertEqual(
            self.readiness(daemon)[1].splitlines()[0],
            "not ready: 1 of 2 listeners are up",
        )

    def test_hostsFileNotWritable(self) -> None:
        """
        Every listener up but the names unwritten is not ready: no name
        resolves, and status shows the problem. Once the file can be
        written, the daemon is ready and the problem gone.
        """
        daemon = self.make_daemon()
        self.registered(daemon)
        os.remove(self.hosts_path)
        os.mkdir(self.hosts_path)
        self.reconcile(daemon, "http://a.test")
        ready, text = self.readiness(daemon)
        self.assertFalse(ready)
        self.assertIn("not ready: endpoint names do not resolve: cannot", text)
        self.assertIn(self.hosts_path, text)
        self.assertEqual(
            [p.what for p in daemon.daemon_status().problems],
            [f"writing the names to {self.hosts_path}"],
        )
        os.rmdir(self.hosts_path)
        self.reconcile(daemon, "http://a.test")
        self.assertEqual(self.readiness(daemon), (True, "ready\n"))
        self.assertEqual(daemon.daemon_status().problems, ())

    def test_noIdentity(self) -> None:
        """
        Without an identity, or with an expired certificate, listeners up
        are not enough.
        """
        daemon = self.make_daemon()
        self.reconcile(daemon, "http://a.test")
        self.assertFalse(self.readiness(daemon)[0])
        self.registered(daemon, not_after=self.reactor.seconds())
        ready, text = self.readiness(daemon)
        self.assertFalse(ready)
        self.assertTrue(
            text.startswith("not ready: the client certificate has expired")
        )

    def test_notOursToFix(self) -> None:
        """
        Endpoints no change on this machine would serve (an unreadable URL,
        two endpoints that need one socket, a name that is not ngrokd's to
        claim) are listed, and the daemon is ready.
        """
        daemon = self.make_daemon()
        self.registered(daemon)
        self.reconcile(
            daemon,
            "http://a.test:443",
            "tls://a.test",
            "ftp://c.test",
            "http://localhost",
        )
        ready, text = self.readiness(daemon)
        self.assertTrue(ready, text)
        lines = text.splitlines()
        self.assertEqual(lines[0], "ready")
        self.assertEqual(len(lines), 4, lines)
        self.assertIn("localhost is not ngrokd's to claim", text)
        self.assertTrue(all(line.startswith("not served: ") for line in lines[1:]))
        self.assertIn("is already served by http://a.test:443", text)


class StateSaveTests(ReconcileFixture):
    """
    A state file that cannot be saved is said once, then summarised, shown
    in status until it can, and said when it can again.
    """

    def test_allocationsCannotBeSaved(self) -> None:
        """
        A day of polls that cannot save the allocations logs the error once
        and a summary each hour; C{ngrokctl status}, C{/status} and the web
        page show it; once the file can be written it is saved, said, and
        gone from status.
        """
        daemon = self.make_daemon()
        blocked = os.path.join(self.state_dir, IP_MAPPINGS)
        os.mkdir(blocked)
        polls = 2880
        for _ in range(polls):
            self.reconcile(daemon, "http://a.test")
            self.reactor.advance(30)
        said = [formatEvent(e) for e in self.events if blocked in formatEvent(e)]
        self.assertEqual(len(said), 24, said[:3])
        self.assertIn("the addresses and ports given out since the last save", said[0])
        self.assertIn("still failing, 121 times since", said[1])
        status = daemon.daemon_status()
        (problem,) = status.problems
        self.assertEqual(
            (problem.what, problem.count), ("saving the addresses and ports", polls)
        )
        feed = EventFeed(daemon.daemon_status, daemon.board, self.reactor)
        control = Controller(daemon, feed, self.reactor, "test")
        lines = status_lines(control.status(), {})
        (shown,) = [line for line in lines if "saving" in line]
        self.assertTrue(
            shown.startswith(
                f"Problem:      saving the addresses and ports: cannot write {blocked}"
            ),
            shown,
        )
        self.assertIn(f"{polls} times", shown)
        document = status_document(status, daemon.endpoint_status())
        self.assertEqual(document["problems"][0]["count"], polls)
        self.assertIn(blocked, render_daemon(status, (None, None)))
        os.rmdir(blocked)
        self.reconcile(daemon, "http://a.test")
        self.assertEqual(
            [formatEvent(e) for e in self.events if "works again" in formatEvent(e)],
            [
                "saving the addresses and ports works again, after failing 2880"
                " times since 1970-01-01 00:00:00 UTC"
            ],
        )
        self.assertEqual(daemon.daemon_status().problems, ())
        self.assertTrue(os.path.isfile(blocked))


class LastGoodTests(ReconcileFixture):
    """
    The last good list, kept in the state directory for a restart.
    """

    def test_cannotBeKept(self) -> None:
        """
        A good poll whose list cannot be kept is served all the same, and
        is a problem in status; the next poll keeps it, even unchanged.
        """
        daemon = self.make_daemon()
        self.registered(daemon)
        blocked = os.path.join(self.state_dir, LAST_GOOD)
        os.mkdir(blocked)
        self.poll(daemon, "http://a.test")
        self.assertEqual(set(daemon.plan.specs), {"http://a.test:80"})
        (problem,) = daemon.daemon_status().problems
        self.assertEqual(
            (problem.what, problem.count),
            ("keeping the last good list of endpoints", 1),
        )
        os.rmdir(blocked)
        self.poll(daemon, "http://a.test")
        self.assertEqual(daemon.daemon_status().problems, ())
        self.assertTrue(os.path.isfile(blocked))

    def poll(self, daemon: Daemon, *urls: str) -> None:
        """
        Poll the bound endpoints, which are C{urls}, as discovery does.
        """
        registration: Registration = daemon.registration
        found = _endpoints(*urls)
        daemon.api.bound_endpoints = lambda operator_id: succeed(found)  # type: ignore[method-assign]
        self.applied(registration.fetch().addCallback(registration.answered))


class IPv6Tests(ReconcileFixture):
    """
    Names with an IPv6 address too, and a machine without IPv6.
    """

    def test_bothAddresses(self) -> None:
        """
        A hostname's IPv4 and IPv6 addresses are set up first, then every
        port of it listens on both, then both its lines are written; the
        IPv6 address is saved in ip6_mappings.json.
        """
        daemon = self.make_daemon(subnet6=SUBNET6)
        self.reconcile(daemon, "http://a.test", "tcp://a.test:5432")
        self.assertEqual(
            self.recorder.events,
            [
                ("addresses", frozenset({A, A6})),
                ("listen", "10.107.0.2", 80),
                ("listen", "10.107.0.2", 5432),
                ("listen", str(A6), 80),
                ("listen", str(A6), 5432),
                ("hosts", {"a.test": (A, A6)}),
            ],
        )
        self.assertIn(f"{BEGIN}\n10.107.0.2\ta.test\n{A6}\ta.test\n{END}", self.hosts())
        with open(os.path.join(self.state_dir, IP6_MAPPINGS)) as f:
            self.assertEqual(f.read(), f'{{\n  "a.test": "{A6}"\n}}')
        self.assertEqual(daemon.plan.name_addresses(), {"a.test": ((A,), (A6,))})
        rows = daemon.endpoint_status()
        self.assertEqual([row.addresses for row in rows], [("10.107.0.2", str(A6))] * 2)
        status = daemon.daemon_status()
        self.assertEqual((status.ipv6_subnet, status.ipv6_error), (SUBNET6, ""))

    def test_withoutIPv6(self) -> None:
        """
        When the IPv6 addresses cannot be added (no IPv6 here), the IPv4
        ones serve: the endpoint listens on IPv4, its IPv4 line is written,
        the daemon is ready, says so once for many reconciles, and status
        says why; once IPv6 works, the names get it.
        """
        daemon = self.make_daemon(subnet6=SUBNET6)
        self.interface.no_ipv6 = "cannot add fd6e:6772:6f6b::2: no IPv6 here"
        self.registered(daemon)
        for _ in range(3):
            self.reconcile(daemon, "http://a.test")
        self.assertEqual(self.interface.present, {A})
        self.assertEqual(
            {e for e in self.recorder.events if e[0] == "listen"},
            {("listen", "10.107.0.2", 80)},
        )
        self.assertEqual(self.recorder.events[-1], ("hosts", {"a.test": (A,)}))
        (row,) = daemon.endpoint_status()
        self.assertEqual((row.state, row.addresses), (LISTENING, ("10.107.0.2",)))
        status = daemon.daemon_status()
        self.assertEqual(
            status.ipv6_error, "cannot add fd6e:6772:6f6b::2: no IPv6 here"
        )
        self.assertTrue(status.ready, status.not_ready_because)
        self.assertIn(
            "<dt>IPv6</dt><dd>unavailable, names are IPv4 only: cannot add",
            render_daemon(status, (None, None)),
        )
        said = [e for e in self.events if "IPv6 is unavailable" in formatEvent(e)]
        self.assertEqual(len(said), 1)
        self.interface.no_ipv6 = ""
        self.reconcile(daemon, "http://a.test")
        self.assertEqual(self.interface.present, {A, A6})
        self.assertEqual(self.recorder.events[-1], ("hosts", {"a.test": (A, A6)}))
        self.assertEqual(daemon.daemon_status().ipv6_error, "")

    def test_ipv6BindFailsAlone(self) -> None:
        """
        An endpoint whose IPv6 socket cannot be bound keeps listening on
        IPv4, its row saying why; the daemon stays ready.
        """
        daemon = self.make_daemon(subnet6=SUBNET6)
        self.registered(daemon)
        self.reactor.taken.add((str(A6), 80))
        self.reconcile(daemon, "http://a.test")
        (row,) = daemon.endpoint_status()
        self.assertEqual((row.state, row.addresses), (LISTENING, ("10.107.0.2",)))
        self.assertIn(f"[{A6}]:80 is already in use", row.ipv6_error)
        self.assertTrue(daemon.daemon_status().ready)


class ListenModeTests(SynchronousTestCase):
    """
    The listen-mode decisions reconcile relies on.
    """

    def test_clientAddress(self) -> None:
        """
        A client on this machine reaches a wildcard listener through the
        loopback address of its family, and any other address directly.
        """
        self.assertEqual(client_address("0.0.0.0", 9080), "127.0.0.1:9080")
        self.assertEqual(client_address("::", 9080), "[::1]:9080")
        self.assertEqual(client_address("192.0.2.7", 9080), "192.0.2.7:9080")
        self.assertEqual(client_address("fd00::7", 9080), "[fd00::7]:9080")

    def test_virtualClientsUseTheName(self) -> None:
        """
        In virtual mode a client uses the endpoint's own name and port, and
        the plan's names are the virtual-mode hostnames only.
        """
        endpoints = [
            BoundEndpoint(url, url, parse_endpoint_url(url))
            for url in ("http://a.ns", "tcp://a.ns:5432", "http://n.ns")
        ]
        result = plan(
            endpoints,
            "virtual",
            {"n.ns": "0.0.0.0"},
            {"a.ns": A},
            {("n.ns", 80): 9080},
        )
        self.assertEqual(
            {url: spec.client_address for url, spec in result.specs.items()},
            {
                "http://a.ns:80": "a.ns:80",
                "tcp://a.ns:5432": "a.ns:5432",
                "http://n.ns:80": "127.0.0.1:9080",
            },
        )
        self.assertEqual(result.virtual_names(), {"a.ns": (ip_address("10.107.0.2"),)})

    def test_usesVirtual(self) -> None:
        """
        Virtual mode is in use when it is the default or any override.
        """
        self.assertTrue(uses_virtual("virtual", {}))
        self.assertTrue(uses_virtual("0.0.0.0", {"a.ns": "virtual"}))
        self.assertFalse(uses_virtual("0.0.0.0", {"a.ns": "127.0.0.1"}))

    def test_withoutAddresses(self) -> None:
        """
        Only virtual-mode listeners on a missing address are failed, with
        the reason.
        """
        endpoints = [
            BoundEndpoint(url, url, parse_endpoint_url(url))
            for url in ("http://a.ns", "http://b.ns")
        ]
        result = plan(
            endpoints,
            "virtual",
            {"b.ns": "10.107.0.2"},
            {"a.ns": A},
            {("b.ns", 80): 9080},
        )
        missing = result.without_addresses({"10.107.0.2": "gone"})
        self.assertEqual(list(missing.specs), ["http://b.ns:80"])
        self.assertEqual(
            missing.failures,
            {"http://a.ns:80": "address 10.107.0.2 for a.ns could not be set up: gone"},
        )
