"""
Tests for L{ngrokd.control.metrics}: C{/metrics} scraped from a daemon made
by C{makeService} after real traffic through the devcloud, and parsed as
Prometheus parses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorUDP
from twisted.names.dns import ESERVER, DNSDatagramProtocol, Query
from twisted.trial.unittest import SynchronousTestCase

from ngrokd import __version__
from ngrokd.config import DnsConfig
from ngrokd.control.metrics import histogram_quantile, poll_result
from ngrokd.daemon import Daemon
from ngrokd.ngrok.api import APIError, APIResponseInvalid, APIUnavailable
from ngrokd.test.helpers import Recorder, connect, exchange, wait_until
from ngrokd.test.test_health import DaemonHealthTestCase, http

ECHO = "tcp://echo.test:7000"

Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def carried(samples: Samples, url: str) -> tuple[float, float]:
    """
    The bytes carried up and down for C{url}.
    """
    name = "ngrokd_endpoint_bytes_total"
    return (
        sample(samples, name, url=url, direction="up"),
        sample(samples, name, url=url, direction="down"),
    )


async def scrape(case: DaemonHealthTestCase, daemon: Daemon) -> Samples:
    """
    What C{/metrics} says now.
    """
    answer = await http(case.url(daemon, "/metrics"))
    case.assertEqual(answer.code, 200)
    case.assertTrue(answer.header("content-type").startswith("text/plain"))
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.body.decode())
        for s in family.samples
    }


class MetricsTests(DaemonHealthTestCase):
    """
    The numbers in C{/metrics} are the traffic sent.
    """

    async def scrape(self, daemon: Daemon) -> Samples:
        return await scrape(self, daemon)

    async def echo(self, port: int, data: bytes) -> Recorder:
        client = await exchange(port, data)
        self.assertEqual(client.received, data)
        return client

    def test_afterTraffic(self) -> Deferred[None]:
        """
        After a failed poll, three echoed connections and one the ingress
        refuses: connections and bytes per endpoint, the refusal by kind,
        one upgrade time per upgraded connection, each counted by how it got
        its TLS handshake (the first in full), one lifetime per
        connection, polls by result, the certificate's expiry, readiness and
        the build.
        """

        async def run() -> None:
            self.devcloud.cloud.faults.next_status(
                503, count=1, path_contains="bound_endpoints"
            )
            daemon = await self.start(listening=0)
            await wait_until(lambda: daemon.discovery.failures == 1, "a failed poll")
            daemon.discovery.poll_now()
            await wait_until(lambda: daemon.daemon_status().ready, "ready")
            port = self.port_of(daemon, ECHO)
            sizes = [1000, 20_000, 300_000]
            for size in sizes:
                await self.echo(port, b"x" * size)
            self.devcloud.cloud.remove_endpoint(ECHO)
            refused = Recorder()
            await connect(port, refused)
            await refused.lost
            await wait_until(
                lambda: daemon.endpoint_status()[0].connections_open == 0, "closes"
            )

            samples = await self.scrape(daemon)
            total = float(sum(sizes))
            self.assertEqual(
                [
                    sample(samples, "ngrokd_endpoint_connections_open", url=ECHO),
                    sample(samples, "ngrokd_endpoint_connections_total", url=ECHO),
                    *carried(samples, ECHO),
                    sample(
                        samples,
                        "ngrokd_endpoint_upstream_failures_total",
                        url=ECHO,
                        kind="refused",
                    ),
                    sample(samples, "ngrokd_upgrade_duration_seconds_count"),
                    sum(
                        sample(samples, "ngrokd_ingress_dials_total", kind=kind)
                        for kind in ("full", "resumed", "pooled")
                    ),
                    sample(samples, "ngrokd_connection_duration_seconds_count"),
                    sample(
                        samples,
                        "ngrokd_discovery_poll_duration_seconds_count",
                        result="api_error",
                    ),
                    sample(samples, "ngrokd_ready"),
                ],
                [0, 4, total, total, 1, 3, 3, 4, 1, 1],
            )
            self.assertGreaterEqual(
                sample(
                    samples, "ngrokd_discovery_poll_duration_seconds_count", result="ok"
                ),
                1,
            )
            self.assertEqual(
                sample(samples, "ngrokd_ingress_dials_total", kind="full"), 1
            )
            self.assertGreater(
                sample(samples, "ngrokd_upgrade_duration_seconds_sum"), 0
            )
            identity = daemon.identity
            assert identity is not None
            self.assertEqual(
                sample(samples, "ngrokd_certificate_expiry_timestamp_seconds"),
                identity.not_after.timestamp(),
            )
            self.assertIn(
                ("version", __version__),
                next(labels for name, labels in samples if name == "ngrokd_build_info"),
            )
            self.assertGreater(sample(samples, "ngrokd_process_open_fds"), 0)

        return ensureDeferred(run())

    def test_openConnectionCounted(self) -> Deferred[None]:
        """
        A connection still open is counted as open, and the bytes it carried
        so far are in the byte counters before it ends.
        """

        async def run() -> None:
            daemon = await self.start()
            client = Recorder()
            await connect(self.port_of(daemon, ECHO), client)
            client.transport.write(b"y" * 5000)
            await wait_until(lambda: len(client.received) == 5000, "the echo")
            samples = await self.scrape(daemon)
            self.assertEqual(
                [
                    sample(samples, "ngrokd_endpoint_connections_open", url=ECHO),
                    *carried(samples, ECHO),
                    sample(samples, "ngrokd_connection_duration_seconds_count"),
                ],
                [1, 5000, 5000, 0],
            )
            client.transport.loseConnection()
            await client.lost

        return ensureDeferred(run())


class PollResultTests(SynchronousTestCase):
    """
    A poll's C{result} label names the kind of failure, from a fixed set.
    """

    def test_kinds(self) -> None:
        """
        Success, no answer, ngrok's refusal, a malformed answer, and anything
        else each have their label.
        """
        self.assertEqual(
            [
                poll_result(None),
                poll_result(APIUnavailable("https://api.test", "refused")),
                poll_result(APIError(429, "ERR_NGROK_1", "slow down", "")),
                poll_result(APIResponseInvalid("https://api.test", "body", "x")),
                poll_result(ValueError()),
            ],
            ["ok", "unavailable", "api_error", "invalid", "error"],
        )


class HistogramQuantileTests(SynchronousTestCase):
    """
    Percentiles read from a histogram's buckets, as Prometheus reads them.
    """

    def test_interpolated(self) -> None:
        """
        The quantile lies within its bucket, in proportion to its rank.
        """
        buckets = [(0.1, 2.0), (0.5, 6.0), (1.0, 10.0), (float("inf"), 10.0)]
        self.assertEqual(histogram_quantile(0.5, buckets), 0.4)
        self.assertAlmostEqual(histogram_quantile(0.1, buckets) or 0, 0.05)
        self.assertAlmostEqual(histogram_quantile(0.99, buckets) or 0, 0.9875)

    def test_edges(self) -> None:
        """
        No observations give no answer; one beyond the last finite bound
        gives that bound, not infinity.
        """
        self.assertIsNone(histogram_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]))
        self.assertEqual(
            histogram_quantile(0.99, [(1.0, 1.0), (float("inf"), 4.0)]), 1.0
        )


class DNSMetricsTests(DaemonHealthTestCase):
    """
    The DNS server's counters in C{/metrics}, while it runs.
    """

    # The server on loopback, its forwards to a loopback port where nothing
    # answers: nothing leaves this machine.
    dns = DnsConfig(mode="hosts", listen="127.0.0.1:0", upstreams=("127.0.0.1:9",))

    def test_counted(self) -> Deferred[None]:
        """
        A query no upstream answers and a packet that is no query are
        counted: one forward, one SERVFAIL, one malformed packet dropped.
        """

        async def run() -> None:
            daemon = await self.start()
            await wait_until(lambda: daemon.names.server_address() is not None, "DNS")
            address = daemon.names.server_address()
            assert address is not None
            client = DNSDatagramProtocol(None)
            udp = cast(IReactorUDP, reactor)
            port = udp.listenUDP(0, client, "127.0.0.1", 8192)
            self.addCleanup(port.stopListening)
            query = client.query(address, [Query("elsewhere.example")], timeout=5)
            answer = await query
            self.assertEqual(answer.rCode, ESERVER)
            client.transport.write(b"\x00\x01garbage", address)
            counters = daemon.names.counters()
            assert counters is not None
            await wait_until(lambda: counters.dropped_malformed == 1, "a drop")
            samples = await scrape(self, daemon)
            self.assertEqual(
                [
                    sample(samples, "ngrokd_dns_forwarded_total"),
                    sample(samples, "ngrokd_dns_servfail_total", reason="upstream"),
                    sample(samples, "ngrokd_dns_dropped_total", reason="malformed"),
                    sample(samples, "ngrokd_dns_answers_total", kind="answer"),
                ],
                [1, 1, 1, 0],
            )

        return ensureDeferred(run())
