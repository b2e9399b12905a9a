# -*- test-case-name: ngrokd.test.test_dns_wire -*-
"""
DNS messages as the server reads and writes them, with twisted.names'
codec: which packets are queries it answers, which get an error code, and
which it drops; and responses sized for the transport they go out on.

twisted.names' own server answers without EDNS and cuts an oversized UDP
response in the middle of a record (twisted/twisted#6949). Here a query's
EDNS OPT record is answered with ours (RFC 6891: version 0, at most
L{EDNS_PAYLOAD} bytes over UDP, BADVERS for a later version), and a
response too large for UDP goes out as its question alone with TC set, so
the client asks again over TCP.
"""

from __future__ import annotations

import struct

from attrs import frozen
from twisted.names import dns

#: The UDP payload we offer and send at most with EDNS: no IP fragments on
#: any usual path (DNS flag day 2020).
EDNS_PAYLOAD = 1232
#: The UDP payload without EDNS (RFC 1035).
PLAIN_PAYLOAD = 512
#: A TCP message's largest size: its length prefix is 16 bits.
TCP_PAYLOAD = 65535
#: EDNS's extended rcode for a version we do not speak (RFC 6891).
BADVERS = 16

_HEADER = struct.Struct("!6H")


class Malformed(Exception):
    """
    A packet that is no query: it is dropped, not answered. The message
    says why, for the log.
    """


@frozen
class Request:
    """
    A query the server answers (perhaps with an error code).

    @ivar message: the query as decoded.
    @ivar edns: the client's UDP payload size when it sent an OPT record,
        else L{None}.
    @ivar rcode: the error code to answer with, before any lookup: FORMERR
        (not one question, two OPT records), NOTIMP (not a QUERY), BADVERS;
        or OK.
    """

    message: dns.Message
    edns: int | None
    rcode: int = dns.OK

    @property
    def query(self) -> dns.Query:
        return self.message.queries[0]


def parse(data: bytes) -> Request:
    """
    The request in C{data}.

    @raise Malformed: C{data} cannot be decoded, is cut short, or is a
        response (answering responses would let two servers loop).
    """
    message = dns.Message()
    try:
        message.fromStr(data)
        counts = _HEADER.unpack_from(data)[2:]
    except (EOFError, ValueError, struct.error) as e:
        raise Malformed(f"cannot be decoded: {e}") from None
    sections = (message.queries, message.answers, message.authority)
    if tuple(len(s) for s in sections) + (len(message.additional),) != counts:
        raise Malformed("shorter than its header says")
    if message.answer:
        raise Malformed("a response, not a query")
    options = [r for r in message.additional if r.type == dns.OPT]
    edns = max(options[0].cls, PLAIN_PAYLOAD) if options else None
    if message.opCode != dns.OP_QUERY:
        return Request(message, edns, dns.ENOTIMP)
    if len(message.queries) != 1 or len(options) > 1:
        return Request(message, edns, dns.EFORMAT)
    if options and (options[0].ttl >> 16) & 0xFF != 0:
        return Request(message, edns, BADVERS)
    return Request(message, edns)


def response(
    request: Request,
    rcode: int,
    answers: list[dns.RRHeader] | tuple[dns.RRHeader, ...] = (),
    authority: list[dns.RRHeader] | tuple[dns.RRHeader, ...] = (),
    additional: list[dns.RRHeader] | tuple[dns.RRHeader, ...] = (),
    auth: bool = False,
) -> dns.Message:
    """
    The response to C{request}: its id, question and flags, our records, and
    our OPT record when the request had one (an upstream's is left out).
    """
    query = request.message
    message = dns.Message(
        id=query.id,
        answer=1,
        opCode=query.opCode,
        recDes=query.recDes,
        recAv=1,
        auth=auth,
        rCode=rcode & 0xF,
        checkingDisabled=query.checkingDisabled,
        maxSize=0,
    )
    message.queries = query.queries[:1]
    message.answers = list(answers)
    message.authority = list(authority)
    message.additional = [r for r in additional if r.type != dns.OPT]
    if request.edns is not None:
        message.additional.append(_opt(rcode >> 4))
    return message


def _opt(extended_rcode: int) -> dns.RRHeader:
    # The OPT pseudo-record: the payload we take in its class, the upper
    # bits of the rcode and version 0 in its TTL, no options.
    return dns.RRHeader(
        b"", dns.OPT, EDNS_PAYLOAD, extended_rcode << 24, dns.UnknownRecord(b"")
    )


def limit(request: Request, tcp: bool) -> int:
    """
    The largest response C{request} may get on its transport.
    """
    if tcp:
        return TCP_PAYLOAD
    if request.edns is None:
        return PLAIN_PAYLOAD
    return min(request.edns, EDNS_PAYLOAD)


def encode(message: dns.Message, size: int) -> bytes:
    """
    C{message} on the wire, at most C{size} bytes: when larger, its question
    and OPT record alone with TC set (RFC 2181 section 9: a client retries
    over TCP).
    """
    data = message.toStr()
    if len(data) <= size:
        return data
    message.trunc = 1
    message.answers = []
    message.authority = []
    message.additional = [r for r in message.additional if r.type == dns.OPT]
    return message.toStr()
