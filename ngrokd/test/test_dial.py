"""
Tests for L{ngrokd.datapath.dial}.
"""

from __future__ import annotations

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.datapath.dial import tcp_client_endpoint


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
