"""
Tests for L{ngrokd.dns.wire} and L{ngrokd.dns.ratelimit}: which packets are
queries, how responses fit their transport, and each source's rate.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.dns.ratelimit import SourceRates
from ngrokd.dns.wire import PLAIN_PAYLOAD, Malformed, encode, limit, parse, response


def _query(edns: int | None = None, **flags: Any) -> dns.Message:
    message = dns.Message(id=5, recDes=1, **flags)
    message.queries = [dns.Query(b"web.default", dns.TXT, dns.IN)]
    if edns is not None:
        message.additional = [
            dns.RRHeader(b"", dns.OPT, edns, 0, dns.UnknownRecord(b""))
        ]
    return message


class ParseTests(SynchronousTestCase):
    """
    Queries are parsed; other packets refused with a reason or answered
    with an error code.
    """

    def test_malformed(self) -> None:
        """
        Garbage, a header alone, a question cut short, a compression loop
        and a response are each L{Malformed}.
        """
        good = _query().toStr()
        loop = struct.pack("!6H", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
        for packet in (
            b"",
            b"\x01",
            good[:12],
            good[:-2],
            loop,
            _query(answer=1).toStr(),
        ):
            with self.assertRaises(Malformed):
                parse(packet)

    def test_errors(self) -> None:
        """
        Two questions are FORMERR, another opcode NOTIMP.
        """
        two = _query()
        two.queries *= 2
        self.assertEqual(parse(two.toStr()).rcode, dns.EFORMAT)
        self.assertEqual(parse(_query(opCode=dns.OP_STATUS).toStr()).rcode, dns.ENOTIMP)

    def test_edns(self) -> None:
        """
        A query's OPT gives its UDP payload size (512 at least); without
        one, 512; over TCP, 65535.
        """
        self.assertEqual(limit(parse(_query(4096).toStr()), tcp=False), 1232)
        self.assertEqual(limit(parse(_query(100).toStr()), tcp=False), PLAIN_PAYLOAD)
        self.assertEqual(limit(parse(_query().toStr()), tcp=False), PLAIN_PAYLOAD)
        self.assertEqual(limit(parse(_query().toStr()), tcp=True), 65535)


class EncodeTests(SynchronousTestCase):
    """
    A response too large for its transport is its question alone, with TC.
    """

    def test_truncated(self) -> None:
        """
        Over its limit, the answers are dropped whole and TC set; the OPT
        record stays.
        """
        request = parse(_query(1232).toStr())
        records = [
            dns.RRHeader(b"web.default", dns.TXT, dns.IN, 5, dns.Record_TXT(b"x" * 200))
            for _ in range(10)
        ]
        full = encode(response(request, dns.OK, records), 65535)
        self.assertEqual(len(_decoded(full).answers), 10)
        cut = _decoded(encode(response(request, dns.OK, records), 1232))
        self.assertTrue(cut.trunc)
        self.assertEqual(
            (cut.answers, [r.type for r in cut.additional]), ([], [dns.OPT])
        )
        self.assertEqual(cut.queries, request.message.queries)


def _decoded(data: bytes) -> dns.Message:
    message = dns.Message()
    message.fromStr(data)
    return message


class SourceRateTests(SynchronousTestCase):
    """
    Each source has a token bucket of its own, and the table is bounded.
    """

    def test_bucket(self) -> None:
        """
        A burst is allowed, then the rate.
        """
        rates = SourceRates(rate=10, burst=5, max_sources=10)
        self.assertEqual([rates.allow("a", 0) for _ in range(6)], [True] * 5 + [False])
        self.assertTrue(rates.allow("b", 0))
        self.assertEqual([rates.allow("a", 0.1) for _ in range(2)], [True, False])

    def test_boundedSources(self) -> None:
        """
        Beyond C{max_sources}, the oldest source is forgotten.
        """
        rates = SourceRates(rate=1, burst=1, max_sources=3)
        for source in "abcdef":
            rates.allow(source, 0)
        self.assertEqual(len(rates), 3)
        self.assertTrue(rates.allow("a", 0))
