"""
Tests for L{ngrokd.dns.zones}, L{ngrokd.dns.table} and
L{ngrokd.dns.answer}: which zones we serve and what each question gets.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.dns.answer import TTL, AnswerKind, answer
from ngrokd.dns.table import build_table
from ngrokd.dns.zones import routing_domains

V4, V6, WILD, DEEP = (
    ip_address("10.107.0.2"),
    ip_address("fd00::2"),
    ip_address("10.107.0.3"),
    ip_address("10.107.0.4"),
)
TABLE = build_table(
    {
        "web.default": [V4, V6],
        "*.apps.default": [WILD],
        "*.x.apps.default": [DEEP],
        "exact.apps.default": [V4],
        "api.example.com": [V4],
        "svc.team.corp": [V4],
    }
)


class RoutingDomainTests(SynchronousTestCase):
    """
    The zones we serve alone are as few as can be, and never public.
    """

    def test_privateTopLevelDomain(self) -> None:
        """
        Names under a top-level domain nobody else answers give that domain.
        """
        self.assertEqual(
            routing_domains(["web.default", "db.default", "*.apps.default"]),
            ("default",),
        )

    def test_publicParentNeverClaimed(self) -> None:
        """
        A name under a public top-level domain is its own zone: not its
        parent, nor the top-level domain. C{prod} is public (a gTLD).
        """
        self.assertEqual(
            routing_domains(["api.example.com", "web.prod", "*.apps.example.co.uk"]),
            ("api.example.com", "apps.example.co.uk", "web.prod"),
        )

    def test_sharedTopLevelDomain(self) -> None:
        """
        A name under a domain that home routers or mDNS answer is its own
        zone, so that their other names still reach them.
        """
        self.assertEqual(
            routing_domains(["web.lan", "nas.local"]), ("nas.local", "web.lan")
        )

    def test_nested(self) -> None:
        """
        A zone under another is dropped; names are compared without case or
        trailing dot.
        """
        self.assertEqual(
            routing_domains(["a.x.example.com", "X.Example.com.", "*.y.x.example.com"]),
            ("x.example.com",),
        )

    @given(
        st.lists(
            st.from_regex(r"[a-z]{1,5}(\.[a-z]{1,5}){0,3}", fullmatch=True), max_size=20
        )
    )
    def test_coversEveryNameMinimally(self, names: list[str]) -> None:
        """
        Every name is in exactly one zone, and no zone is under another.
        """
        zones = routing_domains(names)
        for name in names:
            self.assertEqual(sum(name == z or name.endswith("." + z) for z in zones), 1)
        for zone in zones:
            self.assertFalse(any(zone != z and zone.endswith("." + z) for z in zones))


def _payload(record: dns.RRHeader) -> Any:
    return record.payload


def _ask(
    name: str, qtype: int = dns.A, cls: int = dns.IN
) -> tuple[AnswerKind, list[Any], list[Any]]:
    found = answer(dns.Query(name, qtype, cls), TABLE)
    return (
        found.kind,
        [
            (
                r.type,
                r.ttl,
                str(_payload(r).dottedQuad() if r.type == dns.A else r.payload),
            )
            for r in found.records
        ],
        [(r.name.name, r.type) for r in found.authority],
    )


def _a(address: object) -> tuple[int, int, str]:
    return (dns.A, TTL, str(address))


SOA = [(b"default", dns.SOA)]


class AnswerTests(SynchronousTestCase):
    """
    What each question gets from the table.
    """

    def test_known(self) -> None:
        """
        A known name answers A and AAAA with TTL 5, ANY with both; case and
        a trailing dot do not matter.
        """
        self.assertEqual(_ask("WEB.default.")[:2], (AnswerKind.ANSWER, [_a(V4)]))
        kind, records, _ = _ask("web.default", dns.AAAA)
        self.assertEqual(
            (kind, [r[:2] for r in records]), (AnswerKind.ANSWER, [(dns.AAAA, TTL)])
        )
        self.assertEqual(len(_ask("web.default", dns.ALL_RECORDS)[1]), 2)

    def test_ownerSpelledAsAsked(self) -> None:
        """
        The answer's owner name is the question's, case and all.
        """
        found = answer(dns.Query("WeB.DeFault", dns.A, dns.IN), TABLE)
        self.assertEqual(found.records[0].name.name, b"WeB.DeFault")

    def test_nodata(self) -> None:
        """
        Any other type on a known name is NODATA with the zone's SOA.
        """
        for qtype in (
            dns.AAAA,
            dns.MX,
            dns.TXT,
            65,
        ):
            self.assertEqual(
                _ask("api.example.com", qtype),
                (AnswerKind.NODATA, [], [(b"api.example.com", dns.SOA)]),
            )

    def test_nxdomain(self) -> None:
        """
        An unknown name in our zone is NXDOMAIN with the SOA.
        """
        self.assertEqual(_ask("nope.default"), (AnswerKind.NXDOMAIN, [], SOA))
        self.assertEqual(
            _ask("a.nope.default", dns.AAAA), (AnswerKind.NXDOMAIN, [], SOA)
        )

    def test_wildcards(self) -> None:
        """
        Names under a wildcard answer with it at any depth; the deeper
        wildcard wins, an exact name beats both; the name a wildcard hangs
        from, and a name above ours, exist (NODATA, not NXDOMAIN).
        """
        self.assertEqual(_ask("a.apps.default")[1], [_a(WILD)])
        self.assertEqual(_ask("a.b.apps.default")[1], [_a(WILD)])
        self.assertEqual(_ask("a.x.apps.default")[1], [_a(DEEP)])
        self.assertEqual(_ask("exact.apps.default")[1], [_a(V4)])
        self.assertEqual(_ask("a.exact.apps.default")[1], [_a(WILD)])
        self.assertEqual(_ask("apps.default"), (AnswerKind.NODATA, [], SOA))
        self.assertEqual(_ask("team.corp")[0], AnswerKind.FORWARD)
        self.assertEqual(_ask("svc.team.corp")[0], AnswerKind.ANSWER)

    def test_apex(self) -> None:
        """
        A zone's apex answers SOA and is NODATA for A.
        """
        self.assertEqual(_ask("default", dns.SOA)[0], AnswerKind.ANSWER)
        self.assertEqual(_ask("default"), (AnswerKind.NODATA, [], SOA))

    def test_ptr(self) -> None:
        """
        Our addresses answer PTR with their names (several names may share
        one); another address is forwarded.
        """
        kind, records, _ = _ask("2.0.107.10.in-addr.arpa", dns.PTR)
        self.assertEqual(kind, AnswerKind.ANSWER)
        self.assertEqual(
            [r[2] for r in records],
            [
                str(dns.Record_PTR(n, TTL))
                for n in (
                    "api.example.com",
                    "exact.apps.default",
                    "svc.team.corp",
                    "web.default",
                )
            ],
        )
        self.assertEqual(_ask(V6.reverse_pointer, dns.PTR)[0], AnswerKind.ANSWER)
        self.assertEqual(
            _ask("9.0.107.10.in-addr.arpa", dns.PTR)[0], AnswerKind.FORWARD
        )

    def test_forward(self) -> None:
        """
        A name outside our zones, and a question in another class, are
        forwarded: a public parent of ours is not ours.
        """
        for name in ("example.com", "www.example.com", "com", "prod"):
            self.assertEqual(_ask(name)[0], AnswerKind.FORWARD)
        self.assertEqual(_ask("web.default", cls=dns.CH)[0], AnswerKind.FORWARD)

    def test_badNames(self) -> None:
        """
        A name with a C{*} other than a leading label, or an empty label, is
        refused by name.
        """
        for name in ("a.*.b", "*", "a..b", ""):
            with self.assertRaises(ValueError) as e:
                build_table({name: [V4]})
            self.assertIn(repr(name), str(e.exception))
