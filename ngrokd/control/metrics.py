# -*- test-case-name: ngrokd.test.test_metrics -*-
"""
Prometheus metrics, prefixed C{ngrokd_}, in a registry of their own.

Counting costs the data path nothing: the per-endpoint numbers are the
counters the listeners already keep for status, read when Prometheus
scrapes (bytes of connections still open included, so a long session is
seen before it ends). Only what needs a distribution is observed as it
happens, once per connection or poll, never per byte: the time from accept
to an upgraded connection, the lifetime of each connection, and each
discovery poll's duration and result. The DNS server's counters are read
the same way, while it runs. Without a health server there is no
L{DaemonMetrics}, and the data path does not even read the clock for it.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

import twisted
from ngrokd import __version__
from ngrokd.ngrok.api import APIError, APIResponseInvalid, APIUnavailable

if TYPE_CHECKING:
    from ngrokd.daemon import Daemon

PREFIX = "ngrokd"

#: Seconds from accept to an upgraded connection: TCP, TLS and the upgrade.
UPGRADE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: Connections last from a refused instant to a day-long session.
LIFETIME_BUCKETS = (0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 6 * 3600, 24 * 3600)
POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def poll_result(error: BaseException | None) -> str:
    """
    The C{result} label of a poll: C{ok}, or what kind of failure.
    """
    if error is None:
        return "ok"
    if isinstance(error, APIUnavailable):
        return "unavailable"
    if isinstance(error, APIError):
        return "api_error"
    if isinstance(error, APIResponseInvalid):
        return "invalid"
    return "error"


def histogram_quantile(
    q: float, buckets: Sequence[tuple[float, float]]
) -> float | None:
    """
    The C{q}-quantile of a histogram given as C{(upper bound, cumulative
    count)} pairs ending with C{+Inf}, estimated as Prometheus'
    C{histogram_quantile} does: linearly within the bucket that holds it, and
    the highest finite bound when it falls in the C{+Inf} bucket. C{None}
    without observations.
    """
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank and count > below:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


class DaemonMetrics:
    """
    The daemon's metrics. Building it hooks its observers into C{daemon}'s
    listeners and discovery; C{registry} is what C{/metrics} exposes.
    """

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.registry = CollectorRegistry()
        self.upgrade_seconds = Histogram(
            "upgrade_duration_seconds",
            "Time from accepting a local connection to an upgraded connection"
            " to the binding ingress.",
            namespace=PREFIX,
            buckets=UPGRADE_BUCKETS,
            registry=self.registry,
        )
        self.lifetime_seconds = Histogram(
            "connection_duration_seconds",
            "Lifetime of each local connection, from accept to close.",
            namespace=PREFIX,
            buckets=LIFETIME_BUCKETS,
            registry=self.registry,
        )
        self.poll_seconds = Histogram(
            "discovery_poll_duration_seconds",
            "Duration of each poll of the bound endpoints, by result (its"
            " _count counts the polls).",
            ["result"],
            namespace=PREFIX,
            buckets=POLL_BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(namespace=PREFIX, registry=self.registry)
        self.registry.register(self)
        daemon.listeners.timings = self
        daemon.discovery.on_poll = self.polled

    # The observers

    def upgraded(self, seconds: float) -> None:
        self.upgrade_seconds.observe(seconds)

    def closed(self, seconds: float) -> None:
        self.lifetime_seconds.observe(seconds)

    def polled(self, seconds: float, error: BaseException | None) -> None:
        self.poll_seconds.labels(poll_result(error)).observe(seconds)

    def upgrade_percentiles(self) -> tuple[float | None, float | None]:
        """
        The median and 99th percentile of the time to upgrade, over every
        endpoint since the start, estimated from the histogram's buckets.
        """
        (family,) = self.upgrade_seconds.collect()
        buckets = [
            (float(sample.labels["le"]), sample.value)
            for sample in family.samples
            if sample.name.endswith("_bucket")
        ]
        return histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)

    # The collector: read at each scrape

    def collect(self) -> Iterator[Metric]:
        yield from self._endpoints()
        yield from self._dns()
        connector = self._daemon.connector
        handshakes, pool = connector.handshakes, connector.pool
        yield _by_label(
            CounterMetricFamily,
            "ingress_dials",
            "Upgraded connections to the binding ingress, by how they got"
            " their TLS handshake: ahead, in the warm pool (pooled), or when"
            " accepted, resumed from an earlier connection or in full.",
            "kind",
            pooled=handshakes.pooled,
            full=handshakes.full,
            resumed=handshakes.resumed,
        )
        yield _by_label(
            GaugeMetricFamily,
            "ingress_pool_connections",
            "Warm connections to the binding ingress: ready (TLS done, no"
            " request yet), or being dialled.",
            "state",
            ready=pool.ready,
            dialing=pool.dialing,
        )
        yield _by_label(
            CounterMetricFamily,
            "ingress_pool_discarded",
            "Warm connections closed unused: by ngrokd (retired: too old,"
            " idle, or made with an old certificate) or by the ingress (lost).",
            "reason",
            retired=pool.retired,
            lost=pool.lost,
        )
        status = self._daemon.daemon_status()
        ready = GaugeMetricFamily(
            f"{PREFIX}_ready", "1 when /readyz answers 200, else 0."
        )
        ready.add_metric([], float(status.ready))
        yield ready
        if status.certificate_expires is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_certificate_expiry_timestamp_seconds",
                "When the client certificate for the binding ingress expires.",
                value=status.certificate_expires,
            )
        if status.last_poll is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_discovery_last_success_timestamp_seconds",
                "When the last good poll of the bound endpoints answered.",
                value=status.last_poll,
            )
        build = GaugeMetricFamily(
            f"{PREFIX}_build_info",
            "Always 1; the labels say what runs.",
            labels=["version", "python", "twisted"],
        )
        build.add_metric(
            [__version__, platform.python_version(), twisted.__version__], 1.0
        )
        yield build

    def _endpoints(self) -> Iterator[Metric]:
        labels = ["url"]
        opened = GaugeMetricFamily(
            f"{PREFIX}_endpoint_connections_open",
            "Local connections open now.",
            labels=labels,
        )
        accepted = CounterMetricFamily(
            f"{PREFIX}_endpoint_connections",
            "Local connections accepted.",
            labels=labels,
        )
        carried = CounterMetricFamily(
            f"{PREFIX}_endpoint_bytes",
            "Bytes carried: up from local clients to the endpoint, down back.",
            labels=["url", "direction"],
        )
        failures = CounterMetricFamily(
            f"{PREFIX}_endpoint_upstream_failures",
            "Connections that could not be carried to the endpoint, by kind"
            " (dial, tls, timeout, upgrade, refused, other).",
            labels=["url", "kind"],
        )
        for url, listener in self._daemon.listeners.listeners.items():
            stats = listener.stats
            up, down = stats.bytes_up, stats.bytes_down
            for connection in listener.factory.connections:
                up += connection.bytes_received
                if connection.ingress is not None:
                    down += connection.ingress.bytes_received
            opened.add_metric([url], stats.connections_open)
            accepted.add_metric([url], stats.connections_total)
            carried.add_metric([url, "up"], up)
            carried.add_metric([url, "down"], down)
            for kind, count in sorted(stats.failures.items()):
                failures.add_metric([url, kind], count)
        yield from (opened, accepted, carried, failures)

    def _dns(self) -> Iterator[Metric]:
        counters = self._daemon.names.counters()
        if counters is None:
            return
        yield _by_label(
            CounterMetricFamily,
            "dns_answers",
            "Answers of the DNS server, by kind: from the table (answer,"
            " nodata, nxdomain) or an upstream's passed on (forward).",
            "kind",
            **{kind.value: n for kind, n in counters.answered.items()},
        )
        yield CounterMetricFamily(
            f"{PREFIX}_dns_forwarded",
            "Queries the DNS server sent to an upstream server.",
            value=counters.forwarded,
        )
        yield _by_label(
            CounterMetricFamily,
            "dns_servfail",
            "Queries answered SERVFAIL: no upstream answered in time or none"
            " is usable (upstream), or too many forwards were in flight (busy).",
            "reason",
            upstream=counters.forward_failures,
            busy=counters.forward_busy,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_dns_errors",
            "Queries answered with an error of their own (not one question,"
            " not a query, an EDNS version other than 0).",
            value=counters.errors,
        )
        yield _by_label(
            CounterMetricFamily,
            "dns_dropped",
            "Packets dropped unanswered: no query (malformed), over their"
            " source's rate (rate), or failing unexpectedly (failed).",
            "reason",
            malformed=counters.dropped_malformed,
            rate=counters.dropped_rate,
            failed=counters.failures,
        )
        yield _by_label(
            CounterMetricFamily,
            "dns_tcp_closed",
            "TCP connections the DNS server closed: at once, over its bound"
            " (refused), or idle.",
            "reason",
            refused=counters.tcp_refused,
            idle=counters.tcp_idle_closed,
        )


def _by_label(
    family: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    documentation: str,
    label: str,
    **values: int,
) -> Metric:
    """
    A metric of ngrokd's with one sample per value of one label.
    """
    metric = family(f"{PREFIX}_{name}", documentation, labels=[label])
    for value, number in values.items():
        metric.add_metric([value], number)
    return metric
