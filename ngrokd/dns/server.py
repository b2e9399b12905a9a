# -*- test-case-name: ngrokd.test.test_dns_server -*-
"""
The DNS server's decisions for each packet, apart from the sockets that
carry them (L{ngrokd.dns.protocols}): drop it (over its source's rate, or
no query), answer it from the name table, or forward it, within bounds.

Bounds: each source's rate (L{Limits.rate}, a token bucket; the excess is
dropped unanswered and counted); the forwards in flight
(L{Limits.max_forwards}: beyond it a query gets SERVFAIL at once); the time
each forward takes (L{Limits.forward_timeout}: then SERVFAIL). A query
answered from the table is answered before the next packet is read, so the
forwards are the only queries in flight. Log lines about dropped packets
are bounded too (L{ngrokd.summarylog}).

An answer from the table is kept, keyed by the query's bytes after its id,
until the table changes: a client asking the same name again gets it
without decoding or encoding (at most L{Limits.cached_answers}).
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.python.failure import Failure

from ngrokd.dns.answer import AnswerKind, answer
from ngrokd.dns.forward import Forwarder
from ngrokd.dns.ratelimit import SourceRates
from ngrokd.dns.table import EMPTY_TABLE, NameTable
from ngrokd.dns.wire import Malformed, Request, encode, limit, parse, response
from ngrokd.summarylog import Key, Summary, SummaryLog

#: Sends a response's bytes back the way its query came.
Reply = Callable[[bytes], None]


@frozen
class Limits:
    """
    The DNS server's bounds.

    @ivar rate: queries a second from one source address, on average;
        L{None}: no limit.
    @ivar burst: queries one source may send at once.
    @ivar max_sources: source addresses whose rate is tracked at once.
    @ivar max_forwards: forwarded queries in flight.
    @ivar forward_timeout: seconds a forward may take.
    @ivar max_tcp: TCP connections open at once; more are closed at once.
    @ivar tcp_idle: seconds a TCP connection may stay without a query.
    @ivar tcp_pipeline: queries in flight on one TCP connection before it
        is read no further.
    @ivar cached_answers: answers from the table kept for repeats.
    """

    rate: float | None = 1000.0
    burst: float = 2000.0
    max_sources: int = 4096
    max_forwards: int = 256
    forward_timeout: float = 3.0
    max_tcp: int = 128
    tcp_idle: float = 10.0
    tcp_pipeline: int = 16
    cached_answers: int = 20000


DEFAULT_LIMITS = Limits()


def _answer_counts() -> dict[AnswerKind, int]:
    return dict.fromkeys(AnswerKind, 0)


@define
class Counters:
    """
    What the server did, since it started: plain numbers for the metrics.

    @ivar answered: responses sent, by kind (L{AnswerKind.FORWARD}: an
        upstream's answer passed on).
    @ivar forwarded: queries sent upstream.
    @ivar forward_failures: forwards that got SERVFAIL: the upstream did not
        answer within the bound, or there is no upstream.
    @ivar forward_busy: queries that got SERVFAIL because
        L{Limits.max_forwards} forwards were in flight.
    @ivar errors: queries answered with an error code of their own: not one
        question, not a QUERY, an EDNS version other than 0.
    @ivar dropped_malformed: packets that were no query, dropped.
    @ivar dropped_rate: queries over their source's rate, dropped.
    @ivar tcp_refused: TCP connections closed at once, over L{Limits.max_tcp}.
    @ivar tcp_idle_closed: TCP connections closed for idling.
    @ivar failures: packets whose handling raised an unexpected exception.
    """

    answered: dict[AnswerKind, int] = field(factory=_answer_counts)
    forwarded: int = 0
    forward_failures: int = 0
    forward_busy: int = 0
    errors: int = 0
    dropped_malformed: int = 0
    dropped_rate: int = 0
    tcp_refused: int = 0
    tcp_idle_closed: int = 0
    failures: int = 0


class DropLog(SummaryLog):
    """
    Dropped packets and refused connections, a line for the first of each
    kind and then a count at most every few seconds.
    """

    log = Logger()

    def first(self, key: Key, reason: str) -> None:
        self.log.warn("DNS server: {what}: {reason}", what=key[1], reason=reason)

    def more(self, summary: Summary) -> None:
        self.log.warn(
            "DNS server: {count} more {what}, the last: {reason}",
            count=summary.count,
            what=summary.key[1],
            reason=summary.reason,
        )


class DNSServer:
    """
    Answers the queries the listeners hand it, from the current table.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        forwarder: Forwarder | None,
        limits: Limits = DEFAULT_LIMITS,
        table: NameTable = EMPTY_TABLE,
    ) -> None:
        self.limits = limits
        self.counters = Counters()
        self._clock = clock
        self._forwarder = forwarder
        self._table = table
        self._rates = (
            SourceRates(limits.rate, limits.burst, limits.max_sources)
            if limits.rate is not None
            else None
        )
        self._cache: dict[tuple[bool, bytes], tuple[bytes, AnswerKind]] = {}
        self._forwards: set[Deferred[None]] = set()
        self.drops = DropLog(clock)

    @property
    def table(self) -> NameTable:
        return self._table

    def set_table(self, table: NameTable) -> None:
        """
        Answer from C{table} from now on: every later query sees all of it.
        The answers kept are kept only while the table stays the same.
        """
        if table != self._table:
            self._cache.clear()
        self._table = table

    def received(
        self, data: bytes, source: str, reply: Reply, tcp: bool
    ) -> Deferred[None] | None:
        """
        A packet C{data} came from C{source}: answer it through C{reply},
        now, or later when it is forwarded (then the L{Deferred} fires once
        it is answered), or drop it.

        An unexpected exception never reaches Twisted, which would log a
        traceback for every packet: the first is logged with its traceback,
        the next ones counted.
        """
        try:
            return self._received(data, source, reply, tcp)
        except Exception as e:
            self.counters.failures += 1
            if self.counters.failures == 1:
                self.log.failure(
                    "DNS server: answering a query from {source} failed",
                    source=source,
                )
            else:
                self.drops.occurred(("", "queries failed unexpectedly"), repr(e))
            return None

    def _received(
        self, data: bytes, source: str, reply: Reply, tcp: bool
    ) -> Deferred[None] | None:
        if self._rates is not None and not self._rates.allow(
            source, self._clock.seconds()
        ):
            self.counters.dropped_rate += 1
            self.drops.occurred(
                ("", "queries over their source's rate dropped"), f"from {source}"
            )
            return None
        cached = self._cache.get((tcp, data[2:]))
        if cached is not None:
            reply(data[:2] + cached[0])
            self.counters.answered[cached[1]] += 1
            return None
        try:
            request = parse(data)
        except Malformed as e:
            self.counters.dropped_malformed += 1
            self.drops.occurred(
                ("", "malformed packets dropped"),
                f"{len(data)} bytes from {source}: {e}",
            )
            return None
        if request.rcode != dns.OK:
            self.counters.errors += 1
            reply(encode(response(request, request.rcode), limit(request, tcp)))
            return None
        found = answer(request.query, self._table)
        if found.kind is AnswerKind.FORWARD:
            return self._forward(request, reply, tcp)
        rcode = dns.ENAME if found.kind is AnswerKind.NXDOMAIN else dns.OK
        wire = encode(
            response(request, rcode, found.records, found.authority, auth=True),
            limit(request, tcp),
        )
        if len(self._cache) >= self.limits.cached_answers:
            self._cache.clear()
        self._cache[(tcp, data[2:])] = (wire[2:], found.kind)
        self.counters.answered[found.kind] += 1
        reply(wire)
        return None

    def _forward(
        self, request: Request, reply: Reply, tcp: bool
    ) -> Deferred[None] | None:
        if self._forwarder is None or len(self._forwards) >= self.limits.max_forwards:
            if self._forwarder is None:
                self.counters.forward_failures += 1
            else:
                self.counters.forward_busy += 1
            reply(encode(response(request, dns.ESERVER), limit(request, tcp)))
            return None
        self.counters.forwarded += 1

        def relay(upstream: dns.Message) -> None:
            self.counters.answered[AnswerKind.FORWARD] += 1
            answered = response(
                request,
                upstream.rCode,
                upstream.answers,
                upstream.authority,
                upstream.additional,
            )
            answered.trunc = upstream.trunc
            reply(encode(answered, limit(request, tcp)))

        def failed(reason: Failure) -> None:
            self.counters.forward_failures += 1
            self.drops.occurred(
                ("", "forwards failed"),
                f"{request.query.name} from upstream: {reason.getErrorMessage()}",
            )
            reply(encode(response(request, dns.ESERVER), limit(request, tcp)))

        done = self._forwarder.forward(request.query, tcp).addCallbacks(relay, failed)
        self._forwards.add(done)
        done.addBoth(lambda _: self._forwards.discard(done))
        return done

    def stop(self) -> Deferred[object]:
        """
        Fires once every forward in flight has ended (each within
        L{Limits.forward_timeout}), and the TCP connections to upstream
        servers are closed.
        """
        self.drops.stop()
        pending = DeferredList(list(self._forwards))

        def close(result: object) -> object:
            if self._forwarder is not None:
                self._forwarder.stop()
            self.drops.stop()
            return result

        return pending.addBoth(close)
