# -*- test-case-name: ngrokd.test.test_dns_names -*-
"""
What the DNS server says to one question, decided from the name table
alone.

    - a name of ours answers A and AAAA with its addresses (ANY: both), TTL
      L{TTL} seconds;
    - any other type on a name of ours, and a name that exists without
      addresses (a zone's apex, a name above ours), is NODATA: no error, no
      answer, the zone's SOA in the authority section (RFC 2308), so that
      the resolver caches the absence for L{TTL} seconds. Never "no such
      name": busybox and musl give up on a name whose AAAA is NXDOMAIN;
    - any other name in a zone only we serve is NXDOMAIN, with the SOA;
    - the reverse name of one of our addresses answers PTR with its names;
    - a zone's apex answers SOA;
    - everything else is forwarded to the upstream servers.
"""

from __future__ import annotations

from enum import Enum

from attrs import frozen
from twisted.names import dns

from ngrokd.dns.table import NameTable
from ngrokd.dns.zones import normalise

#: Seconds a resolver may keep an answer, or the absence of one. Short: a
#: name's address changes at the next reconcile.
TTL = 5

#: The classes we answer for: a question in another class is forwarded.
_CLASSES = frozenset({dns.IN, dns.ANY})


class AnswerKind(Enum):
    """
    How a question was answered, as the counters and the tests tell them
    apart.
    """

    ANSWER = "answer"
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"
    FORWARD = "forward"


@frozen
class Answer:
    """
    The records of one answer; both empty for L{AnswerKind.FORWARD}.
    """

    kind: AnswerKind
    records: tuple[dns.RRHeader, ...] = ()
    authority: tuple[dns.RRHeader, ...] = ()


FORWARD = Answer(AnswerKind.FORWARD)


def soa(zone: str) -> dns.RRHeader:
    """
    The SOA of C{zone}: its minimum (how long a resolver keeps a negative
    answer) is L{TTL}.
    """
    record = dns.Record_SOA(
        mname=zone,
        rname="hostmaster." + zone,
        serial=1,
        refresh=3600,
        retry=600,
        expire=86400,
        minimum=TTL,
        ttl=TTL,
    )
    return dns.RRHeader(zone, dns.SOA, dns.IN, TTL, record, auth=True)


def _negative(kind: AnswerKind, zone: str | None) -> Answer:
    return Answer(kind, authority=(soa(zone),) if zone is not None else ())


def _addresses(owner: bytes, name: str, qtype: int, table: NameTable) -> Answer | None:
    addresses = table.addresses(name)
    if addresses is None:
        return None
    records = []
    for address in addresses:
        if address.version == 4 and qtype in (dns.A, dns.ALL_RECORDS):
            payload: dns.Record_A | dns.Record_AAAA = dns.Record_A(str(address), TTL)
            records.append(dns.RRHeader(owner, dns.A, dns.IN, TTL, payload, True))
        elif address.version == 6 and qtype in (dns.AAAA, dns.ALL_RECORDS):
            payload = dns.Record_AAAA(str(address), TTL)
            records.append(dns.RRHeader(owner, dns.AAAA, dns.IN, TTL, payload, True))
    if records:
        return Answer(AnswerKind.ANSWER, tuple(records))
    return _negative(AnswerKind.NODATA, table.zone_of(name))


def _pointers(owner: bytes, name: str, qtype: int, table: NameTable) -> Answer | None:
    names = table.pointers.get(name)
    if names is None or qtype not in (dns.PTR, dns.ALL_RECORDS):
        return None
    return Answer(
        AnswerKind.ANSWER,
        tuple(
            dns.RRHeader(owner, dns.PTR, dns.IN, TTL, dns.Record_PTR(n, TTL), True)
            for n in names
        ),
    )


def answer(query: dns.Query, table: NameTable) -> Answer:
    """
    The answer to C{query} from C{table}. Records are owned by the name as
    the question spelled it (resolvers that vary its case check the echo).
    """
    if query.cls not in _CLASSES:
        return FORWARD
    owner = query.name.name
    name = normalise(owner.decode("latin-1"))
    found = _addresses(owner, name, query.type, table) or _pointers(
        owner, name, query.type, table
    )
    if found is not None:
        return found
    zone = table.zone_of(name)
    if zone is None:
        return FORWARD
    if name == zone and query.type in (dns.SOA, dns.ALL_RECORDS):
        return Answer(AnswerKind.ANSWER, (soa(zone),))
    if table.exists(name):
        return _negative(AnswerKind.NODATA, zone)
    return _negative(AnswerKind.NXDOMAIN, zone)
