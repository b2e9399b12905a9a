"""
Tests for L{ngrokd.datapath.dial}: which address a dial goes to, and when
a name is looked up.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import DNSLookupError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.datapath.dial import REFRESH_AFTER, ResolvedName, tcp_client_endpoint


class TCPClientEndpointTests(SynchronousTestCase):
    """
    An address is dialled at once; only a name is resolved.
    """

    def test_addressDialledDirectly(self) -> None:
        """
        IPv4 and IPv6 addresses are connected to straight away, with the
        timeout, without a name lookup.
        """
        for host in ["127.0.0.1", "::1"]:
            reactor = MemoryReactorClock()
            endpoint = tcp_client_endpoint(reactor, host, 443, 7.0)
            endpoint.connect(Factory.forProtocol(Protocol))
            [(dialled, port, _, timeout, _)] = reactor.tcpClients
            self.assertEqual((dialled, port, timeout), (host, 443, 7.0))

    def test_nameResolved(self) -> None:
        """
        A name goes through L{HostnameEndpoint}, which resolves it.
        """
        endpoint = tcp_client_endpoint(MemoryReactorClock(), "ingress.test", 443, 7.0)
        self.assertIsInstance(endpoint, HostnameEndpoint)


class ResolvedNameTests(SynchronousTestCase):
    """
    A name is looked up once, refreshed in the background, and its next
    address is tried after a failed dial.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.asked: list[Deferred[list[str]]] = []
        self.lookups = 0
        self.name = ResolvedName(self.reactor, "ingress.test", self.lookup)

    def lookup(self, host: str) -> Deferred[list[str]]:
        self.assertEqual(host, "ingress.test")
        answer: Deferred[list[str]] = Deferred()
        self.asked.append(answer)
        self.lookups += 1
        return answer

    def dial(self) -> str:
        """
        Dial port 443; the address connected to, or C{"lookup"} when the
        dial resolves the name itself.
        """
        endpoint = self.name.endpoint(443, 7.0)
        if isinstance(endpoint, HostnameEndpoint):
            return "lookup"
        endpoint.connect(Factory.forProtocol(Protocol))
        host, port, _, timeout, _ = self.reactor.tcpClients[-1]
        self.assertEqual((port, timeout), (443, 7.0))
        return str(host)

    def test_lookedUpOnce(self) -> None:
        """
        The first dial resolves for itself and starts one lookup; once it
        answers, every dial goes straight to the first address.
        """
        self.assertEqual(self.dial(), "lookup")
        self.assertEqual(self.dial(), "lookup")
        self.asked.pop().callback(["192.0.2.1", "192.0.2.2"])
        self.assertEqual([self.dial() for _ in range(10)], ["192.0.2.1"] * 10)
        self.assertEqual((self.lookups, self.asked), (1, []))

    def test_refreshedInBackground(self) -> None:
        """
        An answer older than the refresh period is still used while a new
        lookup runs; the new answer is used once it comes.
        """
        self.dial()
        self.asked.pop().callback(["192.0.2.1"])
        self.reactor.advance(REFRESH_AFTER)
        self.assertEqual(self.dial(), "192.0.2.1")
        self.assertEqual(self.dial(), "192.0.2.1")
        self.asked.pop().callback(["2001:db8::1"])
        self.assertEqual(self.dial(), "2001:db8::1")
        self.assertEqual(self.lookups, 2)

    def test_failedDialMovesOn(self) -> None:
        """
        After a failed dial the next address is tried and the name is looked
        up again.
        """
        self.dial()
        self.asked.pop().callback(["192.0.2.1", "192.0.2.2"])
        self.name.failed()
        self.assertEqual(self.dial(), "192.0.2.2")
        self.asked.pop().callback(["192.0.2.1", "192.0.2.2"])
        self.name.failed()
        self.assertEqual(self.dial(), "192.0.2.1")

    def test_failedLookupKeepsAnswer(self) -> None:
        """
        A lookup that fails leaves the last answer in use, and is said once
        however often it fails.
        """
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        self.dial()
        self.asked.pop().callback(["192.0.2.1"])
        for _ in range(3):
            self.reactor.advance(REFRESH_AFTER)
            self.dial()
            self.asked.pop().errback(DNSLookupError("ingress.test"))
        self.assertEqual(self.dial(), "192.0.2.1")
        said = [e for e in events if "looking up" in e["log_format"]]
        self.assertEqual(len(said), 1)

    def test_addressNeverLookedUp(self) -> None:
        """
        An address is dialled as it is, failed or not.
        """
        name = ResolvedName(self.reactor, "::1", self.lookup)
        name.endpoint(443, 7.0).connect(Factory.forProtocol(Protocol))
        name.failed()
        self.assertEqual(self.reactor.tcpClients[-1][0], "::1")
        self.assertEqual((self.lookups, self.asked), (0, []))
