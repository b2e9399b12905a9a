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
discovery poll's duration and result. The DNS server's counters are read
the same way, while it runs. Without a health server there is no
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
        #: The process's own facts, read in a thread before each scrape.
        self.process = ProcessFacts()
        self.registry.register(self.process)
        self._series = EndpointSeries()
        daemon.listeners.watch(self._series.changed)
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

    def endpoint_series(self) -> Iterator[bytes]:
        """
        The per-endpoint series, as exposition text in pieces.
        """
        return self._series.pieces(
            self._daemon.listeners.listeners,
            self._daemon.config.server.metrics_per_endpoint,
        )


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
        for connection in listener.factory.connections:
            up += connection.bytes_received
            if connection.ingress is not None:
                down += connection.ingress.bytes_received
    return up, down


_go_float = cast(Callable[[float], str], floatToGoString)


def _number(value: int) -> str:
    """
    A count as C{generate_latest} writes it (a float, in Go's exponent
    form from seven digits on).
    """
    return f"{value}.0" if 0 <= value < 1_000_000 else _go_float(value)


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

#: Endpoints whose text is kept as one piece.
ENDPOINTS_AT_ONCE = 500

#: One endpoint's lines, or those of a piece of them: a text per family.
Lines = tuple[bytes, bytes, bytes, bytes]


class EndpointSeries:
    """
    The per-endpoint series of the first C{cap} listeners in URL order, as
    the text C{generate_latest} would write for them.

    The text is kept, in pieces of L{ENDPOINTS_AT_ONCE} endpoints, and a
    piece is made again only when one of its endpoints counted something
    since (L{changed}, which the listeners call), or has connections open
    (their bytes grow without a change); so a scrape of 10,000 endpoints of
    which a few are busy makes the text of those few pieces and joins the
    rest. Each piece reads the counters as they are then (they only grow;
    Prometheus takes each sample as read).
    """

    def __init__(self) -> None:
        #: The URLs with series, in order; all the listeners' URLs; the cap.
        self._urls: list[str] = []
        self._known: set[str] = set()
        self._cap = 0
        self._pieces: list[Lines | None] = []
        self._changed: set[str] = set()
        #: The endpoints with connections open at the last scrape.
        self._open: set[str] = set()

    def changed(self, url: str) -> None:
        """
        The listener of C{url} counted something, or came or went.
        """
        self._changed.add(url)

    def pieces(self, listeners: Mapping[str, Carried], cap: int) -> Iterator[bytes]:
        if cap <= 0:
            return
        if self._known != listeners.keys() or self._cap != cap:
            self._urls = sorted(listeners)[:cap]
            self._known, self._cap = set(listeners), cap
            self._pieces = [None] * -(-len(self._urls) // ENDPOINTS_AT_ONCE)
        urls = self._urls
        count = len(self._pieces)
        changed, self._changed = self._changed | self._open, set()
        self._open = set()
        for n in range(count):
            some = urls[n * ENDPOINTS_AT_ONCE : (n + 1) * ENDPOINTS_AT_ONCE]
            if self._pieces[n] is None or not changed.isdisjoint(some):
                self._pieces[n] = self._make(some, listeners)
                yield b""  # a turn of the reactor
        made = [piece for piece in self._pieces if piece is not None]
        for n, family in enumerate(_FAMILIES):
            yield _header(*family) + b"".join([piece[n] for piece in made])

    def _make(self, urls: list[str], listeners: Mapping[str, Carried]) -> Lines:
        lines: list[list[str]] = [[], [], [], []]
        for url in urls:
            listener = listeners.get(url)
            if listener is None:
                continue
            stats = listener.stats
            if stats.connections_open:
                self._open.add(url)
            label = _label(url)
            up, down = _in_flight(stats, [listener])
            lines[0].append(
                f"{PREFIX}_endpoint_connections_open"
                f'{{url="{label}"}} {_number(stats.connections_open)}\n'
            )
            lines[1].append(
                f"{PREFIX}_endpoint_connections_total"
                f'{{url="{label}"}} {_number(stats.connections_total)}\n'
            )
            name = f"{PREFIX}_endpoint_bytes_total"
            lines[2].append(
                f'{name}{{direction="up",url="{label}"}} {_number(up)}\n'
                f'{name}{{direction="down",url="{label}"}} {_number(down)}\n'
            )
            name = f"{PREFIX}_endpoint_upstream_failures_total"
            lines[3].extend(
                f'{name}{{kind="{_label(kind)}",url="{label}"}} {_number(count)}\n'
                for kind, count in sorted(stats.failures.items())
            )
        texts = ["".join(family).encode("utf-8") for family in lines]
        return texts[0], texts[1], texts[2], texts[3]


def _header(name: str, kind: str, documentation: str) -> bytes:
    return (
        f"# HELP {PREFIX}_{name} {documentation}\n# TYPE {PREFIX}_{name} {kind}\n"
    ).encode()


def _label(value: str) -> str:
    """
    A label value as the exposition format escapes it.
    """
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ProcessFacts:
    """
    The process's CPU time, memory and open files (C{ProcessCollector}'s
    C{ngrokd_process_*}), read by L{refresh} in a thread, not when the
    scrape is rendered: counting the open files lists C{/proc/self/fd}, an
    entry per listener and connection.
    """

    def __init__(self) -> None:
        self._collector = ProcessCollector(namespace=PREFIX, registry=None)
        self._families: list[Metric] = []

    def refresh(self) -> None:
        """
        Read the facts now (blocking: in a thread).
        """
        self._families = list(self._collector.collect())

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


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
