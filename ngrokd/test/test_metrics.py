"""
Tests for L{ngrokd.control.metrics}: C{/metrics} scraped from a daemon made
by C{makeService} after real traffic through the devcloud, and parsed as
Prometheus parses it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import partial
from types import SimpleNamespace
from typing import Any, cast

import attrs
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorUDP
from twisted.names.dns import ESERVER, DNSDatagramProtocol, Query
from twisted.trial.unittest import SynchronousTestCase

from ngrokd import __version__
from ngrokd.config import DnsConfig
from ngrokd.control.metrics import EndpointSeries, histogram_quantile, poll_result
from ngrokd.daemon import Daemon
from ngrokd.datapath.bridge import BridgeFactory, EndpointStats
from ngrokd.endpoints import parse_endpoint_url
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


class ScrapeTestCase(DaemonHealthTestCase):
    """
    A daemon's C{/metrics}, scraped and parsed as Prometheus does.
    """

    async def scrape(self, daemon: Daemon) -> Samples:
        return await scrape(self, daemon)

    async def echo(self, port: int, data: bytes) -> Recorder:
        client = await exchange(port, data)
        self.assertEqual(client.received, data)
        return client


class MetricsTests(ScrapeTestCase):
    """
    The numbers in C{/metrics} are the traffic sent.
    """

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
            # The totals over every endpoint say the same.
            self.assertEqual(
                [
                    sample(samples, "ngrokd_connections_open"),
                    sample(samples, "ngrokd_connections_total"),
                    sample(samples, "ngrokd_bytes_total", direction="up"),
                    sample(samples, "ngrokd_bytes_total", direction="down"),
                    sample(samples, "ngrokd_upstream_failures_total", kind="refused"),
                    sample(samples, "ngrokd_endpoints", state="listening"),
                    sample(samples, "ngrokd_endpoints_without_series"),
                ],
                [0, 4, total, total, 1, 1, 0],
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


class PerEndpointCapTests(ScrapeTestCase):
    """
    C{server.metrics_per_endpoint} caps the endpoints with series of their
    own; the totals count every endpoint.
    """

    endpoints = [ECHO, "tcp://other.test:7001"]

    def test_cappedAndOff(self) -> Deferred[None]:
        """
        Capped at one, the first URL alone has series; at zero, none does;
        the totals and the count of endpoints left out are there either way.
        """

        async def run() -> None:
            daemon = await self.start(listening=2)
            await self.echo(self.port_of(daemon, ECHO), b"abc")
            await self.echo(self.port_of(daemon, "tcp://other.test:7001"), b"de")
            for cap, urls in [(1, {ECHO}), (0, set())]:
                server = attrs.evolve(daemon.config.server, metrics_per_endpoint=cap)
                daemon.config = attrs.evolve(daemon.config, server=server)
                samples = await self.scrape(daemon)
                self.assertEqual(
                    {
                        dict(labels)["url"]
                        for name, labels in samples
                        if name.startswith("ngrokd_endpoint_")
                    },
                    urls,
                )
                self.assertEqual(
                    [
                        sample(samples, "ngrokd_connections_total"),
                        sample(samples, "ngrokd_bytes_total", direction="up"),
                        sample(samples, "ngrokd_endpoints_without_series"),
                    ],
                    [2, 5, 2 - cap],
                )

        return ensureDeferred(run())


class EndpointSeriesTests(SynchronousTestCase):
    """
    L{EndpointSeries} writes what C{generate_latest} wrote for the same
    counters when each scrape built its families in one go.
    """

    def test_sameTextAsTheRegistry(self) -> None:
        """
        Every family and sample, labels escaped and values formatted alike.
        """
        urls = ["tcp://a.b:1", 'http://we"ird\\name', "tcp://c.d:12345"]
        series = EndpointSeries()
        listeners = {}
        for n, url in enumerate(urls):
            stats = EndpointStats(
                connections_total=10**n * 12345 + n,
                bytes_up=n * 1000,
                bytes_down=n * 10**9,
                failures={"refused": n, "dial": 1} if n else {},
                on_change=partial(series.changed, url),
            )
            factory = BridgeFactory(
                parse_endpoint_url("tcp://x.y:1"), cast(Any, None), None, stats
            )
            listeners[url] = SimpleNamespace(stats=stats, factory=factory)
        for _ in range(2):  # made, then kept
            text = b"".join(series.pieces(listeners, 10))
            self.assertEqual(text, generate_latest(_OldCollector(listeners)))
        self.assertEqual(b"".join(series.pieces(listeners, 0)), b"")
        # Counted since: made again, and again while the connection is open.
        listeners[urls[1]].stats.opened()
        for _ in range(2):
            text = b"".join(series.pieces(listeners, 10))
            self.assertEqual(text, generate_latest(_OldCollector(listeners)))
        self.assertIn(b'_connections_open{url="http://we\\"ird\\\\name"} 1.0', text)
        listeners[urls[1]].stats.closed(5, 6)
        text = b"".join(series.pieces(listeners, 10))
        self.assertEqual(text, generate_latest(_OldCollector(listeners)))
        # Capped: the first URL in order.
        first = min(urls)
        self.assertEqual(
            b"".join(series.pieces(listeners, 1)),
            generate_latest(_OldCollector({first: listeners[first]})),
        )


class _OldCollector:
    """
    The per-endpoint families as they were collected before.
    """

    def __init__(self, listeners: dict[str, Any]) -> None:
        self._listeners = listeners

    def collect(self) -> Iterator[Metric]:
        opened = GaugeMetricFamily(
            "ngrokd_endpoint_connections_open",
            "Local connections open now.",
            labels=["url"],
        )
        accepted = CounterMetricFamily(
            "ngrokd_endpoint_connections", "Local connections accepted.", labels=["url"]
        )
        carried = CounterMetricFamily(
            "ngrokd_endpoint_bytes",
            "Bytes carried: up from local clients to the endpoint, down back.",
            labels=["url", "direction"],
        )
        failures = CounterMetricFamily(
            "ngrokd_endpoint_upstream_failures",
            "Connections that could not be carried to the endpoint, by kind"
            " (dial, tls, timeout, upgrade, refused, other).",
            labels=["url", "kind"],
        )
        for url, listener in sorted(self._listeners.items()):
            stats = listener.stats
            opened.add_metric([url], stats.connections_open)
            accepted.add_metric([url], stats.connections_total)
            carried.add_metric([url, "up"], stats.bytes_up)
            carried.add_metric([url, "down"], stats.bytes_down)
            for kind, count in sorted(stats.failures.items()):
                failures.add_metric([url, kind], count)
        yield from (opened, accepted, carried, failures)


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
