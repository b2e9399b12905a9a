"""
Tests for L{ngrokd.names}: which names ngrokd may claim on this machine.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.config import parse_config
from ngrokd.names import NO_FACTS, NameRules, is_numeric, name_rules, refusal

RULES = NameRules(
    reserved={
        "api.ngrok.com": "the ngrok API's host (api.url)",
        "kubernetes-binding-ingress.ngrok.io": "the binding ingress's host"
        " (ingressEndpoint)",
    },
    pinned=frozenset({"db.prod", "gateway.lan"}),
)


class RefusalTests(SynchronousTestCase):
    """
    L{refusal} says why a name is not ngrokd's to claim, for each kind of
    name that is not, and nothing for one that is.
    """

    def assertRefused(self, name: str, rules: NameRules, why: str) -> None:
        reason = refusal(name, rules)
        self.assertEqual(
            reason, f"{name.lower().rstrip('.')} is not ngrokd's to claim: {why}"
        )

    def test_ordinaryNames(self) -> None:
        """
        Names of the endpoints' own shapes are claimed.
        """
        for name in ("web.prod", "api.example.app", "a.test", "xn--bcher-kva.ns"):
            self.assertIsNone(refusal(name, RULES), name)

    def test_localhost(self) -> None:
        """
        C{localhost} and every name under it name this machine itself.
        """
        for name in ("localhost", "LocalHost", "localhost.", "app.localhost"):
            self.assertRefused(
                name, NO_FACTS, "it names this machine itself (RFC 6761)"
            )
        self.assertIsNone(refusal("localhost.prod", NO_FACTS))
        self.assertIsNone(refusal("mylocalhost", NO_FACTS))

    def test_numeric(self) -> None:
        """
        A name a resolver reads as an address is refused: dotted quads,
        shortened and whole-number IPv4 forms, hexadecimal and octal
        labels, any name whose last label is all digits, IPv6 literals.
        """
        for name in (
            "192.0.2.77",
            "127.1",
            "2130706433",
            "0x7f.0.0.1",
            "0x7f",
            "0177.0.0.1",
            "1.2.3.4.5",
            "web.123",
            "::1",
            "2001:db8::7",
        ):
            self.assertTrue(is_numeric(name), name)
            self.assertRefused(name, NO_FACTS, "it reads as an IP address, not a name")
        for name in ("123.prod", "1password.com", "0xdead.beef.ns", "x0.1a"):
            self.assertFalse(is_numeric(name), name)
            self.assertIsNone(refusal(name, NO_FACTS), name)

    def test_ownHosts(self) -> None:
        """
        The ngrok API's and the binding ingress's hosts are refused, saying
        which; a name under them is not either.
        """
        self.assertRefused(
            "api.ngrok.com",
            RULES,
            "it is the ngrok API's host (api.url), which ngrokd must reach",
        )
        self.assertRefused(
            "Kubernetes-Binding-Ingress.ngrok.io.",
            RULES,
            "it is the binding ingress's host (ingressEndpoint), which ngrokd"
            " must reach",
        )
        self.assertIsNone(refusal("x.api.ngrok.com", RULES))

    def test_pinned(self) -> None:
        """
        A name the hosts file sets outside ngrokd's section keeps the
        address given there.
        """
        self.assertRefused(
            "DB.prod",
            RULES,
            "the hosts file sets it outside ngrokd's section, and that address stays",
        )
        self.assertIsNone(refusal("db.prod", NO_FACTS))
        self.assertIsNone(refusal("x.db.prod", RULES))

    def test_allowedDomains(self) -> None:
        """
        With allowed domains, only names equal to one or under one are
        claimed; the reason lists the first three domains and counts the
        rest.
        """
        rules = NameRules(allowed_domains=("prod", "example.internal"))
        for name in ("prod", "web.prod", "a.b.example.internal", "Web.Prod."):
            self.assertIsNone(refusal(name, rules), name)
        for name in ("web.staging", "xprod", "internal", "example.internal.evil"):
            self.assertRefused(
                name,
                rules,
                "it is outside net.allowed_domains (prod, example.internal)",
            )
        many = NameRules(allowed_domains=("a", "b", "c", "d", "e"))
        self.assertRefused(
            "web.prod", many, "it is outside net.allowed_domains (a, b, c and 2 more)"
        )

    def test_wildcards(self) -> None:
        """
        A wildcard is judged by its suffix; one over a public suffix would
        take a part of the public DNS, and is refused; a name the hosts
        file pins is no reason to refuse the wildcard under it, which gives
        that name itself no address.
        """
        self.assertIsNone(refusal("*.apps.prod", RULES))
        self.assertIsNone(refusal("*.default", RULES))
        self.assertIsNone(refusal("*.db.prod", RULES))
        for suffix in ("prod", "co.uk", "com"):
            self.assertRefused(
                f"*.{suffix}",
                RULES,
                f"a wildcard over {suffix}, a public suffix, would take every"
                " name under it from the DNS",
            )
        self.assertRefused(
            "*.x.localhost", RULES, "it names this machine itself (RFC 6761)"
        )
        self.assertRefused(
            "*.apps.staging",
            NameRules(allowed_domains=("prod",)),
            "it is outside net.allowed_domains (prod)",
        )

    @given(st.from_regex(r"[a-z][a-z0-9-]{0,10}\.[a-z]{1,8}", fullmatch=True))
    def test_noFactsNoRefusal(self, name: str) -> None:
        """
        With no facts, a name of letters that is not under C{localhost} is
        claimed.
        """
        if name.endswith(".localhost"):
            return
        self.assertIsNone(refusal(name, NO_FACTS))


class NameRulesTests(SynchronousTestCase):
    """
    L{name_rules} takes the reserved hosts and the allowed domains from the
    configuration.
    """

    def test_fromConfig(self) -> None:
        """
        The API's host (from C{api.url}, port and path aside) and the
        ingress's host are reserved, lowercase; C{net.allowed_domains}
        applies; the pinned names are those given.
        """
        config = parse_config(
            "api:\n  url: https://API.example.com:8443/v2\n"
            "ingressEndpoint: Ingress.example.com:4443\n"
            "net:\n  allowed_domains: [prod]\n",
            "/etc/ngrokd/config.yml",
            {},
            "linux",
        ).config
        rules = name_rules(config, frozenset({"db.prod"}))
        self.assertEqual(
            dict(rules.reserved),
            {
                "api.example.com": "the ngrok API's host (api.url)",
                "ingress.example.com": "the binding ingress's host (ingressEndpoint)",
            },
        )
        self.assertEqual(rules.allowed_domains, ("prod",))
        self.assertEqual(rules.pinned, frozenset({"db.prod"}))
        self.assertIsNotNone(refusal("api.example.com", rules))
        self.assertIsNone(refusal("web.prod", rules))
