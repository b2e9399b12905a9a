"""
Tests for L{ngrokd.host.probe}: the verdicts, with the lookup faked (the
real C{getaddrinfo} through systemd-resolved is in L{test_resolved}).
"""

from __future__ import annotations

import socket
from ipaddress import ip_address
from typing import Any

from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.host.probe import ProbeResult, probe
from ngrokd.test.test_netif import ImmediateReactor, SynchronousThreadPool

WEB = ip_address("10.107.0.2")


def answers(*addresses: str) -> Any:
    def lookup(name, port, family, kind):
        return [
            (socket.AF_INET, kind, 6, "", (address, 0))
            for address in addresses
            for _ in range(2)
        ]

    return lookup


class NeverThreadPool(ThreadPool):
    """
    Takes work and never runs it: a lookup that hangs.
    """

    def callInThreadWithCallback(self, onResult, func, *args, **kw):
        pass


class ProbeTests(SynchronousTestCase):
    def probe(self, lookup, pool=None, clock=None) -> Any:
        return probe(
            ImmediateReactor(),
            clock or Clock(),
            pool or SynchronousThreadPool(),
            "web.prod",
            WEB,
            lookup=lookup,
        )

    def test_resolves(self) -> None:
        """
        The expected address among the answers: resolved, no reason; each
        address once.
        """
        result = self.successResultOf(self.probe(answers("10.107.0.2", "10.9.9.9")))
        self.assertEqual(
            result, ProbeResult("web.prod", ("10.107.0.2", "10.9.9.9"), None)
        )
        self.assertTrue(result.ok)

    def test_otherAddress(self) -> None:
        """
        Answers without the expected address: the reason names both.
        """
        result = self.successResultOf(self.probe(answers("192.0.2.7")))
        self.assertFalse(result.ok)
        self.assertEqual(
            result.reason, "web.prod resolved to 192.0.2.7, not 10.107.0.2"
        )

    def test_notFound(self) -> None:
        """
        A lookup error is the reason, as the resolver said it.
        """

        def lookup(*args):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        result = self.successResultOf(self.probe(lookup))
        self.assertEqual(
            result.reason,
            "web.prod did not resolve: [Errno -2] Name or service not known",
        )

    def test_timeout(self) -> None:
        """
        A lookup that does not end within the timeout gives a result saying
        so, then and not before.
        """
        clock = Clock()
        d = self.probe(answers(), NeverThreadPool(), clock)
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.assertEqual(
            self.successResultOf(d).reason,
            "web.prod did not resolve: no answer within 2 s",
        )
