"""
Tests for C{ngrokctl diagnose} (L{ngrokd.control.diagnose}): the pure
checks, then the whole walk against a running daemon and the devcloud, with
one hop broken at a time.
"""

from __future__ import annotations

import datetime
import json
import os
from ipaddress import ip_address
from typing import Any

import attrs
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ngrokd.control.client import EXIT_FAILED, EXIT_OK
from ngrokd.control.diagnose import (
    FAIL,
    PASS,
    Check,
    certificate_check,
    check_lines,
    first_broken,
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
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.host.hostsection import pinned_names, render
from ngrokd.host.resolved import DNS_SCOPE, LinkState, ResolvedError
from ngrokd.host.resolverfiles import resolver_file
from ngrokd.test.test_control import DaemonFixture
from ngrokd.test.test_ctl import ngrokctl


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


#: Seconds between HostnameEndpoint's connection attempts.
ATTEMPT_DELAY = 0.3


class DiagnoseTests(DaemonFixture, TestCase):
    """
    C{ngrokctl diagnose} against a daemon serving the devcloud's two
    endpoints in network mode.
    """

    def setUp(self) -> None:
        self.devcloud = self.start_devcloud(self)
        self.socket = os.path.join(self.socket_dir(self), "ngrokd.sock")

    async def diagnose(self, *argv: str) -> tuple[int, dict[str, Any]]:
        ran = await ngrokctl(self.socket, "diagnose", "-o", "json", *argv)
        return ran.code, ran.json()

    def test_healthy(self) -> Deferred[None]:
        """
        Every hop of a working setup passes, each endpoint's upgrade and
        listener among them; the table says so too.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.socket)
            code, document = await self.diagnose()
            self.assertEqual(code, EXIT_OK, document)
            self.assertIsNone(document["first_broken"])
            names = [check["name"] for check in document["checks"]]
            self.assertEqual(
                names,
                [
                    "config valid",
                    "daemon reachable",
                    "API reachable, key accepted",
                    "certificate valid",
                    "ingress resolves",
                    "ingress TCP connects",
                    "ingress TLS verifies",
                    "upgrade answers for http://web.test:80",
                    "upgrade answers for tcp://echo.test:7000",
                    "http://web.test listener accepts",
                    "tcp://echo.test:7000 listener accepts",
                ],
            )
            self.assertEqual({c["state"] for c in document["checks"]}, {PASS})
            ran = await ngrokctl(self.socket, "diagnose")
            self.assertEqual(ran.code, EXIT_OK)
            self.assertEqual(ran.out.splitlines()[-1], "every check passed")

        return ensureDeferred(run())

    def test_daemonNotRunning(self) -> Deferred[None]:
        """
        Without a daemon, the walk stops being useful at the control socket
        and says so; the hops that need no daemon are still checked.
        """

        async def run() -> None:
            code, document = await self.diagnose("--config", self.devcloud.config_path)
            self.assertEqual(code, EXIT_FAILED)
            self.assertEqual(document["first_broken"], "daemon reachable")
            states = {c["name"]: c["state"] for c in document["checks"]}
            self.assertEqual(states["API reachable, key accepted"], PASS)

        return ensureDeferred(run())

    def test_ingressDown(self) -> Deferred[None]:
        """
        With the ingress gone, the first broken hop is the TCP connection
        to it.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.socket)
            port = self.devcloud.ingress_address[1]
            for listening in self.devcloud._ports:
                if listening.getHost().port == port:  # type: ignore[attr-defined]
                    await maybeDeferred(listening.stopListening)
            code, document = await self.diagnose()
            self.assertEqual(code, EXIT_FAILED)
            self.assertEqual(document["first_broken"], "ingress TCP connects")
            # A HostnameEndpoint whose every address refused fails at once
            # but keeps its attempt timer for one more tick.
            await deferLater(reactor, ATTEMPT_DELAY + 0.1, lambda: None)

        return ensureDeferred(run())

    def test_wrongKey(self) -> Deferred[None]:
        """
        A key the API refuses is the first broken hop, with what to do.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.socket)
            with open(self.devcloud.config_path) as f:
                original = f.read()
            key = json.dumps(self.devcloud.api_key)
            wrong = os.path.join(self.devcloud.state_dir, "wrong-key.yml")
            with open(wrong, "w") as f:
                f.write(original.replace(key, '"not-the-key"'))
            code, document = await self.diagnose("--config", wrong)
            self.assertEqual(code, EXIT_FAILED)
            broken = document["first_broken"]
            self.assertEqual(broken, "API reachable, key accepted")
            (check,) = [c for c in document["checks"] if c["name"] == broken]
            self.assertIn("set-api-key", check["hint"])

        return ensureDeferred(run())

    def test_listenerNotAccepting(self) -> Deferred[None]:
        """
        A listener that no longer accepts is named, the other passes.
        """

        async def run() -> None:
            daemon = await self.start_daemon(self, self.devcloud, self.socket)
            (echo,) = [
                listener
                for key, listener in daemon.listeners.listeners.items()
                if key.startswith("tcp://echo.test")
            ]
            assert echo.port is not None
            await maybeDeferred(echo.port.stopListening)
            code, document = await self.diagnose()
            self.assertEqual(code, EXIT_FAILED)
            self.assertEqual(
                document["first_broken"], "tcp://echo.test:7000 listener accepts"
            )
            states = {c["name"]: c["state"] for c in document["checks"]}
            self.assertEqual(states["http://web.test listener accepts"], PASS)

        return ensureDeferred(run())
