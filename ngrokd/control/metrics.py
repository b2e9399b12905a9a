# -*- test-case-name: ngrokd.test.test_metrics -*-
"""
Prometheus metrics, prefixed C{ngrokd_}, in a registry of their own.

Counting costs the data path nothing: the per-endpoint numbers are the
counters the listeners already keep for status, and the totals the same
counts for every listener, those gone included; they are read when
Prometheus scrapes (bytes of connections still open included, so a long
session is seen before it ends). The per-endpoint series are read from the
counters themselves, without a status row, and written as text in pieces
(L{EndpointSeries}), which C{/metrics} writes between the reactor's turns;
C{server.metrics_per_endpoint} caps how many endpoints have them (the
first in URL order; 0: none). Only what needs a distribution is observed as it
happens, once per connection or poll, never per byte: the time from accept
to an upgraded connection, the lifetime of each connection, and each
discovery poll's duration and result. Without a health server there is no
L{DaemonMetrics}, and the data path does not even read the clock for it.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

import twisted
from ngrokd import __version__
from ngrokd.board import STATES
from ngrokd.control.slices import batched
from ngrokd.datapath.bridge import BridgeFactory, EndpointStats
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
        yield from self._totals()
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

    def _totals(self) -> Iterator[Metric]:
        daemon = self._daemon
        totals = daemon.listeners.totals
        up, down = _in_flight(totals, daemon.listeners.listeners.values())
        yield GaugeMetricFamily(
            f"{PREFIX}_connections_open",
            "Local connections open now, every endpoint's.",
            value=totals.connections_open,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_connections",
            "Local connections accepted, every endpoint's.",
            value=totals.connections_total,
        )
        yield _by_label(
            CounterMetricFamily,
            "bytes",
            "Bytes carried for every endpoint: up from local clients, down back.",
            "direction",
            up=up,
            down=down,
        )
        yield _by_label(
            CounterMetricFamily,
            "upstream_failures",
            "Connections that could not be carried, every endpoint's, by kind"
            " (dial, tls, timeout, upgrade, refused, other).",
            "kind",
            **dict(sorted(totals.failures.items())),
        )
        board = daemon.board
        yield _by_label(
            GaugeMetricFamily,
            "endpoints",
            "Bound endpoints, by state.",
            "state",
            **{state: board.count(state) for state in STATES},
        )
        cap = daemon.config.server.metrics_per_endpoint
        yield GaugeMetricFamily(
            f"{PREFIX}_endpoints_without_series",
            "Endpoints with a listener whose own series are left out"
            " (server.metrics_per_endpoint); the totals count them.",
            value=max(0, len(daemon.listeners.listeners) - cap),
        )

    def endpoint_series(self) -> Iterator[bytes]:
        """
        The per-endpoint series, as exposition text in pieces.
        """
        return EndpointSeries(
            self._daemon.listeners.listeners,
            self._daemon.config.server.metrics_per_endpoint,
        ).pieces()


class Carried(Protocol):
    """
    A listener as the metrics read it.
    """

    @property
    def stats(self) -> EndpointStats: ...
    @property
    def factory(self) -> BridgeFactory: ...


def _in_flight(stats: EndpointStats, listeners: Iterable[Carried]) -> tuple[int, int]:
    """
    The bytes of C{stats}, with those of the connections still open on
    C{listeners}.
    """
    up, down = stats.bytes_up, stats.bytes_down
    for listener in listeners:
        if listener.stats.connections_open:
            for connection in listener.factory.connections:
                up += connection.bytes_received
                if connection.ingress is not None:
                    down += connection.ingress.bytes_received
    return up, down


#: A sample's value as C{generate_latest} writes it.
_number = cast(Callable[[float], str], floatToGoString)

#: The per-endpoint families: name, type, help.
_FAMILIES = (
    ("endpoint_connections_open", "gauge", "Local connections open now."),
    ("endpoint_connections_total", "counter", "Local connections accepted."),
    (
        "endpoint_bytes_total",
        "counter",
        "Bytes carried: up from local clients to the endpoint, down back.",
    ),
    (
        "endpoint_upstream_failures_total",
        "counter",
        "Connections that could not be carried to the endpoint, by kind"
        " (dial, tls, timeout, upgrade, refused, other).",
    ),
)

#: Endpoints written in one piece.
ENDPOINTS_AT_ONCE = 250


class EndpointSeries:
    """
    The per-endpoint series of the first C{cap} listeners in URL order, as
    the text C{generate_latest} would write for them, made a few hundred
    endpoints at a time: each piece reads the counters as they are then
    (they only grow; Prometheus takes each sample as read).
    """

    def __init__(self, listeners: Mapping[str, Carried], cap: int) -> None:
        self._listeners = listeners
        self._cap = cap

    def pieces(self) -> Iterator[bytes]:
        if self._cap <= 0:
            return
        urls = sorted(self._listeners)[: self._cap]
        writers = (self._open, self._accepted, self._bytes, self._failures)
        for family, lines in zip(_FAMILIES, writers, strict=True):
            yield _header(*family)
            for batch in batched(urls, ENDPOINTS_AT_ONCE):
                yield self._lines(batch, lines)

    def _lines(
        self, urls: list[str], lines: Callable[[str, Carried], Iterator[str]]
    ) -> bytes:
        text: list[str] = []
        for url in urls:
            listener = self._listeners.get(url)
            if listener is not None:
                text.extend(lines(_label(url), listener))
        return "".join(text).encode("utf-8")

    @staticmethod
    def _open(url: str, listener: Carried) -> Iterator[str]:
        value = _number(listener.stats.connections_open)
        yield f'{PREFIX}_endpoint_connections_open{{url="{url}"}} {value}\n'

    @staticmethod
    def _accepted(url: str, listener: Carried) -> Iterator[str]:
        value = _number(listener.stats.connections_total)
        yield f'{PREFIX}_endpoint_connections_total{{url="{url}"}} {value}\n'

    @staticmethod
    def _bytes(url: str, listener: Carried) -> Iterator[str]:
        up, down = _in_flight(listener.stats, [listener])
        name = f"{PREFIX}_endpoint_bytes_total"
        yield f'{name}{{direction="up",url="{url}"}} {_number(up)}\n'
        yield f'{name}{{direction="down",url="{url}"}} {_number(down)}\n'

    @staticmethod
    def _failures(url: str, listener: Carried) -> Iterator[str]:
        name = f"{PREFIX}_endpoint_upstream_failures_total"
        for kind, count in sorted(listener.stats.failures.items()):
            yield f'{name}{{kind="{_label(kind)}",url="{url}"}} {_number(count)}\n'


def _header(name: str, kind: str, documentation: str) -> bytes:
    return (
        f"# HELP {PREFIX}_{name} {documentation}\n# TYPE {PREFIX}_{name} {kind}\n"
    ).encode()


def _label(value: str) -> str:
    """
    A label value as the exposition format escapes it.
    """
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


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
