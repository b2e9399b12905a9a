"""
Tests for L{ngrokd.control.hops}, the pure checks of C{ngrokctl diagnose},
with L{ngrokd.control.verdict}'s verdict and the text
L{ngrokd.control.render.check_lines} makes of them.
"""

from __future__ import annotations

import datetime
from ipaddress import ip_address
from typing import Any

import attrs
from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.control.hops import (
    certificate_check,
    hosts_check,
    lookup_name,
    resolv_conf_check,
    resolved_check,
    resolver_files_check,
    resolves_check,
    server_check,
    shadow_check,
    virtual_names,
)
from ngrokd.control.render import check_lines
from ngrokd.control.verdict import FAIL, PASS, Check, first_broken
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.host.hostsection import pinned_names, render
from ngrokd.host.resolved import DNS_SCOPE, LinkState, ResolvedError
from ngrokd.host.resolverfiles import resolver_file


class CheckTests(SynchronousTestCase):
    """
    The checks that decide from what was read.
    """

    def test_firstBroken(self) -> None:
        """
        The verdict names the first failed check; hints show under failures.
        """
        checks = [
            Check("config valid", PASS, "/etc/ngrokd/config.yml"),
            Check("daemon reachable", FAIL, "not running", "start it"),
            Check("API reachable, key accepted", FAIL, "refused", "new key"),
        ]
        self.assertEqual(first_broken(checks), checks[1])
        self.assertEqual(
            check_lines(checks),
            [
                "PASS  config valid: /etc/ngrokd/config.yml",
                "FAIL  daemon reachable: not running",
                "      hint: start it",
                "FAIL  API reachable, key accepted: refused",
                "      hint: new key",
                "first broken hop: daemon reachable",
            ],
        )
        self.assertEqual(check_lines(checks[:1])[-1], "every check passed")

    def test_certificate(self) -> None:
        """
        A certificate is valid until its expiry, which the check shows.
        """
        ca = CertificateAuthority.create("test CA")
        cert_pem, _ = ca.issue_server(["host.test"])
        expires = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
        before = certificate_check(
            cert_pem, "tls.crt", expires - datetime.timedelta(days=3)
        )
        self.assertEqual(before.state, PASS)
        self.assertIn("in 3 days", before.detail)
        after = certificate_check(cert_pem, "tls.crt", expires)
        self.assertEqual(after.state, FAIL)
        self.assertIn("expired", after.detail)
        garbage = certificate_check(b"nope", "tls.crt", expires)
        self.assertEqual(garbage.state, FAIL)

    def test_hostsSection(self) -> None:
        """
        The section matches when it holds exactly the daemon's names (each
        with its IPv4 and IPv6 address); a missing name is named; with DNS
        serving the names, the section must be gone.
        """
        names = {
            "a.test": (ip_address("10.107.0.2"), ip_address("fd00::2")),
            "b.test": (ip_address("10.107.0.3"),),
        }
        text = render("127.0.0.1\tlocalhost\n", names)
        self.assertEqual(hosts_check("/etc/hosts", text, names).state, PASS)
        partial = render("127.0.0.1\tlocalhost\n", {"a.test": names["a.test"]})
        check = hosts_check("/etc/hosts", partial, names)
        self.assertEqual(check.state, FAIL)
        self.assertIn("missing b.test", check.detail)
        v4_only = render("", {"a.test": names["a.test"][:1]})
        self.assertIn("missing a.test", hosts_check("h", v4_only, names).detail)
        self.assertEqual(hosts_check("h", "127.0.0.1\tlocalhost\n", {}).state, PASS)
        stale = hosts_check("h", text, {})
        self.assertEqual((stale.state, stale.detail), (FAIL, "h: stale"))

    def test_virtualNamesAndResolution(self) -> None:
        """
        Virtual-mode rows give names (wildcards too) and their IPv4 and
        IPv6 addresses; a name must resolve to every one of them.
        """
        rows: list[dict[str, Any]] = [
            {
                "mode": "virtual",
                "listen_address": "10.107.0.2:5432",
                "client_address": "db.test:5432",
                "addresses": ["10.107.0.2", "fd00::2"],
            },
            {
                "mode": "virtual",
                "listen_address": "10.107.0.3:80",
                "client_address": "*.apps.test:80",
            },
            {
                "mode": "0.0.0.0",
                "listen_address": "0.0.0.0:9080",
                "client_address": "127.0.0.1:9080",
            },
        ]
        names = virtual_names(rows)
        self.assertEqual(
            names,
            {
                "db.test": (ip_address("10.107.0.2"), ip_address("fd00::2")),
                "*.apps.test": (ip_address("10.107.0.3"),),
            },
        )
        self.assertEqual(
            [lookup_name(n) for n in names], ["db.test", "ngrokd-diagnose.apps.test"]
        )
        db = names["db.test"]
        both = resolves_check("db.test", db, ["fd00::2", "10.107.0.2"])
        self.assertEqual((both.state, both.detail), (PASS, "10.107.0.2, fd00::2"))
        v4 = resolves_check("db.test", db, ["10.107.0.2"])
        self.assertEqual((v4.state, v4.detail), (FAIL, "to 10.107.0.2, not fd00::2"))
        wrong = resolves_check("db.test", db, ["192.0.2.1"])
        self.assertEqual(wrong.state, FAIL)
        self.assertIn("192.0.2.1", wrong.detail)
        self.assertIn("nsswitch.conf", wrong.hint)
        self.assertIn(
            "the way to ngrokd's DNS server",
            resolves_check("db.test", db, [], dns_serves=True).hint,
        )
        wildcard = resolves_check("*.apps.test", names["*.apps.test"], "no such name")
        self.assertEqual(
            (wildcard.state, wildcard.detail),
            (FAIL, "ngrokd-diagnose.apps.test: to no such name, not 10.107.0.3"),
        )
        self.assertIn("cannot hold a wildcard", wildcard.hint)

    def test_hostsLineShadows(self) -> None:
        """
        A hosts line outside our section naming one of our names, or a name
        under one of our wildcards, is named; one naming another is not.
        """
        text = render(
            "192.0.2.1 db.test other.test\n192.0.2.2 x.apps.test\n",
            {"web.test": ip_address("10.107.0.4")},
        )
        pinned = pinned_names(text)
        check = shadow_check("/etc/hosts", pinned, ["db.test", "*.apps.test"])
        self.assertEqual(check.state, FAIL)
        self.assertEqual(
            check.detail,
            "/etc/hosts sets db.test, x.apps.test outside ngrokd's section",
        )
        self.assertIn("remove the line", check.hint)
        self.assertEqual(
            shadow_check("h", pinned, ["web.test", "*.b.test"]).state, PASS
        )

    def test_serverAnswers(self) -> None:
        """
        Our DNS server must answer the name it was asked with every address
        of it; no answer, or another, is named.
        """
        expected = (ip_address("10.107.0.2"), ip_address("fd00::2"))
        found = ["10.107.0.2", "fd00::2"]
        ok = server_check("10.107.0.1:53", "db.test", expected, found)
        self.assertEqual(
            (ok.state, ok.detail),
            (PASS, "10.107.0.1:53: db.test is 10.107.0.2, fd00::2"),
        )
        short = server_check("10.107.0.1:53", "db.test", expected, found[:1])
        self.assertEqual(short.state, FAIL)
        self.assertIn("not fd00::2", short.detail)
        silent = server_check("10.107.0.1:53", "db.test", expected, "no answer")
        self.assertEqual(
            (silent.state, silent.detail), (FAIL, "10.107.0.1:53: db.test: no answer")
        )
        self.assertIn("dns.listen", silent.hint)

    def test_resolvedLink(self) -> None:
        """
        resolved must have a DNS scope on our link, our server, every
        routing domain and no default route there; each missing part is
        named, and resolved not running says to start it.
        """
        server = ip_address("10.107.0.1")
        domains = ("apps.prod", "web.prod")
        good = LinkState(
            DNS_SCOPE, (server,), (("apps.prod", True), ("web.prod", True)), False
        )

        def check(state: LinkState | ResolvedError) -> Check:
            return resolved_check("ngrokd0", state, server, domains)

        self.assertEqual(
            check(good),
            Check(
                "systemd-resolved routes our domains",
                PASS,
                "ngrokd0: server 10.107.0.1, domains ~apps.prod ~web.prod",
            ),
        )
        failed = {
            "no scope": check(attrs.evolve(good, scopes=0)),
            "no server": check(attrs.evolve(good, servers=())),
            "a domain missing": check(attrs.evolve(good, domains=good.domains[:1])),
            "default route": check(attrs.evolve(good, default_route=True)),
            "stopped": check(
                ResolvedError(
                    "cannot read link 2: systemd-resolved is not running",
                    "org.freedesktop.DBus.Error.ServiceUnknown",
                )
            ),
            "no link": check(ResolvedError("cannot read link 2: NoSuchLink")),
        }
        self.assertEqual({c.state for c in failed.values()}, {FAIL})
        self.assertEqual(
            {what: c.detail for what, c in failed.items()},
            {
                "no scope": "ngrokd0: no DNS scope",
                "no server": "ngrokd0: DNS servers none, not 10.107.0.1",
                "a domain missing": "ngrokd0: no routing domain ~web.prod",
                "default route": "ngrokd0 is a default route: every name goes to"
                " ngrokd's server",
                "stopped": "cannot read link 2: systemd-resolved is not running",
                "no link": "ngrokd0: cannot read link 2: NoSuchLink",
            },
        )
        self.assertIn("systemctl start systemd-resolved", failed["stopped"].hint)
        self.assertIn("without carrier", failed["no scope"].hint)

    def test_resolvConf(self) -> None:
        """
        resolv.conf must send programs to resolved's stub first: a link to
        its stub file or a file naming 127.0.0.53 does; another local stub
        (a VPN client's) is named as such, other servers as a resolv.conf
        resolved does not manage.
        """
        stub = "/run/systemd/resolve/stub-resolv.conf"
        linked = resolv_conf_check("/etc/resolv.conf", stub, "nameserver 127.0.0.53\n")
        self.assertEqual(
            (linked.state, linked.detail),
            (PASS, f"/etc/resolv.conf (a link to {stub}): nameserver 127.0.0.53"),
        )
        plain = "# by hand\nnameserver 127.0.0.53\noptions edns0\n"
        self.assertEqual(resolv_conf_check("r", None, plain).state, PASS)
        vpn = resolv_conf_check(
            "r", None, "nameserver 127.0.2.2\nnameserver 127.0.0.53\n"
        )
        self.assertEqual(vpn.state, FAIL)
        self.assertIn("127.0.2.2 first, a local DNS stub", vpn.detail)
        self.assertIn("VPN client", vpn.hint)
        upstream = resolv_conf_check(
            "r", "/run/systemd/resolve/resolv.conf", "nameserver 192.0.2.53\n"
        )
        self.assertEqual(upstream.state, FAIL)
        self.assertIn("not managed by resolved", upstream.detail)
        self.assertIn("ln -sf /run/systemd/resolve/stub-resolv.conf", upstream.hint)
        empty = resolv_conf_check("r", None, "")
        self.assertEqual((empty.state, "no server" in empty.detail), (FAIL, True))

    def test_resolverFiles(self) -> None:
        """
        On macOS each routing domain needs its /etc/resolver file naming
        our server and port; a missing file, or another's, is named.
        """
        server = ip_address("127.0.0.2")
        ours = resolver_file(server, 5353)
        domains = ("apps.prod", "web.prod")

        def check(contents: dict[str, bytes | None]) -> Check:
            return resolver_files_check(
                "/etc/resolver", domains, contents, server, 5353
            )

        good = check({"apps.prod": ours, "web.prod": ours})
        self.assertEqual(
            (good.state, good.detail), (PASS, "/etc/resolver: apps.prod, web.prod")
        )
        missing = check({"apps.prod": ours, "web.prod": None})
        self.assertEqual(
            (missing.state, missing.detail), (FAIL, "missing /etc/resolver/web.prod")
        )
        other = check({"apps.prod": b"nameserver 192.0.2.1\n", "web.prod": ours})
        self.assertEqual(other.state, FAIL)
        self.assertIn("/etc/resolver/apps.prod: not ngrokd's", other.detail)
