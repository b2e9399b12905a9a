"""
Tests for L{ngrokd.datapath.listeners.ListenerSet} on real sockets on 127.0.0.1:
what becomes of a listener that cannot bind, and of the others.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from ngrokd.datapath.ingress import IngressConnector
from ngrokd.datapath.listeners import ListenerSet
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.plan import ListenSpec
from ngrokd.test.helpers import unused_port


def _spec(url: str, address: str, port: int) -> ListenSpec:
    return ListenSpec(address, port, parse_endpoint_url(url))


def _nonlocal_bind() -> bool:
    try:
        with open("/proc/sys/net/ipv4/ip_nonlocal_bind") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


async def _wait(check: Any, timeout: float = 5.0) -> None:
    """
    Wait (bounded) until C{check()} holds.
    """
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("not in time")


class ListenerSetTests(TestCase):
    """
    A listener that cannot bind is failed with a reason a user can act on,
    the others listen, and it is tried again at the next reconcile.
    """

    def setUp(self) -> None:
        connector = IngressConnector(reactor, "127.0.0.1", 1, trust=None)
        self.addCleanup(connector.stop)
        self.listeners = ListenerSet(reactor, connector)
        self.addCleanup(self.listeners.stop)

    def holder(self) -> tuple[socket.socket, int]:
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        held.listen()
        self.addCleanup(held.close)
        return held, held.getsockname()[1]

    async def test_portInUse(self) -> None:
        """
        A port another program listens on fails only its endpoint, naming
        the program where /proc tells; once freed, the next reconcile binds.
        """
        held, port = self.holder()
        specs: dict[str, Any] = {
            "tcp://busy.test:5432": _spec("tcp://busy.test:5432", "127.0.0.1", port),
            "tcp://free.test:5432": _spec(
                "tcp://free.test:5432", "127.0.0.1", unused_port()
            ),
        }
        await self.listeners.reconcile(specs)
        busy = self.listeners.listeners["tcp://busy.test:5432"]
        self.assertFalse(busy.listening)
        self.assertIn(f"127.0.0.1:{port} is already in use by ", busy.error)
        if os.path.exists("/proc/net/tcp"):
            self.assertIn(f"pid {os.getpid()} (", busy.error)
        self.assertTrue(self.listeners.listeners["tcp://free.test:5432"].listening)
        held.close()
        await self.listeners.reconcile(specs)
        self.assertTrue(busy.listening)
        self.assertEqual(busy.error, "")

    async def test_holderKeptWhenLookupFindsNobody(self) -> None:
        """
        When a later lookup of who holds the port finds nobody (scanning
        processes races with them), the reason keeps the holder found
        before, and the unchanged failure is not logged again.
        """
        _, port = self.holder()
        answers = [["pid 42 (postgres)"], []]
        listeners = ListenerSet(
            reactor,
            IngressConnector(reactor, "127.0.0.1", 1),
            find_owners=lambda address, port: succeed(answers.pop(0)),
        )
        self.addCleanup(listeners.stop)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        specs = {"tcp://busy.test:1": _spec("tcp://busy.test:1", "127.0.0.1", port)}
        await listeners.reconcile(specs)
        await listeners.reconcile(specs)
        busy = listeners.listeners["tcp://busy.test:1"]
        self.assertEqual(
            busy.error, f"127.0.0.1:{port} is already in use by pid 42 (postgres)"
        )
        failures = [e for e in logged if "cannot listen" in e.get("log_format", "")]
        self.assertEqual(len(failures), 1)

    async def test_ipv6ListenerSharesTheEndpoint(self) -> None:
        """
        An endpoint's IPv6 listener listens beside its IPv4 one, with the
        same factory: its connections count with the endpoint's. It stops
        when it is no longer wanted, the IPv4 one staying; a stop takes
        both.
        """
        port = unused_port()
        url = "tcp://a.test:5432"
        await self.listeners.reconcile(
            {url: _spec(url, "127.0.0.1", port)}, {url: _spec(url, "::1", port)}
        )
        v4, v6 = self.listeners.listeners[url], self.listeners.listeners6[url]
        self.assertTrue(v4.listening and v6.listening, (v4.error, v6.error))
        self.assertIs(v6.factory, v4.factory)
        with socket.create_connection(("::1", port), timeout=5):
            pass
        await _wait(lambda: v4.stats.connections_total == 1)
        await self.listeners.reconcile({url: _spec(url, "127.0.0.1", port)})
        self.assertEqual(self.listeners.listeners6, {})
        self.assertFalse(v6.listening)
        self.assertTrue(v4.listening)
        await self.listeners.reconcile(
            {url: _spec(url, "127.0.0.1", port)}, {url: _spec(url, "::1", port)}
        )
        v6 = self.listeners.listeners6[url]
        await self.listeners.stop()
        self.assertEqual((v4.listening, v6.listening), (False, False))

    async def test_freedBindReused(self) -> None:
        """
        An address and port freed by a removed endpoint can be given to a
        new endpoint in the same reconcile: the old listener stops first.
        """
        port = unused_port()
        await self.listeners.reconcile(
            {"tcp://old.test:1": _spec("tcp://old.test:1", "127.0.0.1", port)}
        )
        await self.listeners.reconcile(
            {"tcp://new.test:1": _spec("tcp://new.test:1", "127.0.0.1", port)}
        )
        self.assertEqual(list(self.listeners.listeners), ["tcp://new.test:1"])
        self.assertTrue(self.listeners.listeners["tcp://new.test:1"].listening)

    async def test_missingAddress(self) -> None:
        """
        A configured address this machine does not have fails its endpoint
        with a reason naming the address and the settings that chose it.
        """
        if _nonlocal_bind():
            raise SkipTest("net.ipv4.ip_nonlocal_bind=1 lets any address be bound")
        url = "tcp://far.test:5432"
        await self.listeners.reconcile({url: _spec(url, "192.0.2.1", unused_port())})
        self.assertEqual(
            self.listeners.listeners[url].error,
            "192.0.2.1 is not an address of this machine (check"
            " net.listen_interface and net.overrides)",
        )

    async def test_changedSpec(self) -> None:
        """
        A listener whose C{Host} rewrite changes on the same address and
        port keeps its socket, and its connections get the new rewrite; one
        whose port changes moves to the new port, still counting with the
        endpoint's connections, and the old port is free again.
        """
        url = "http://a.test:80"
        first, second = unused_port(), unused_port()
        spec = _spec(url, "127.0.0.1", first)
        await self.listeners.reconcile({url: spec})
        listener = self.listeners.listeners[url]
        port = listener.port
        await self.listeners.reconcile({url: attrs.evolve(spec, rewrite_host="b.test")})
        self.assertIs(self.listeners.listeners[url], listener)
        self.assertIs(listener.port, port)
        self.assertEqual(listener.factory.rewrite_host, "b.test")
        await self.listeners.reconcile({url: attrs.evolve(spec, port=second)})
        moved = self.listeners.listeners[url]
        self.assertTrue(moved.listening, moved.error)
        self.assertIs(moved.factory, listener.factory)
        self.assertEqual(moved.factory.rewrite_host, None)
        with socket.create_connection(("127.0.0.1", second), timeout=5):
            pass
        await _wait(lambda: moved.stats.connections_total == 1)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", first))
