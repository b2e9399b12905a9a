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
    resolves_check,
    virtual_names,
)
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.host.hosts import render
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
        The section matches when it holds exactly the daemon's names; a
        missing name is named.
        """
        names = {"a.test": ip_address("10.107.0.2"), "b.test": ip_address("10.107.0.3")}
        text = render("127.0.0.1\tlocalhost\n", names)
        self.assertEqual(hosts_check("/etc/hosts", text, names).state, PASS)
        partial = render("127.0.0.1\tlocalhost\n", {"a.test": names["a.test"]})
        check = hosts_check("/etc/hosts", partial, names)
        self.assertEqual(check.state, FAIL)
        self.assertIn("missing b.test", check.detail)

    def test_virtualNamesAndResolution(self) -> None:
        """
        Virtual-mode rows give names and addresses; a name must resolve to
        its own address.
        """
        rows: list[dict[str, Any]] = [
            {
                "mode": "virtual",
                "listen_address": "10.107.0.2:5432",
                "client_address": "db.test:5432",
            },
            {
                "mode": "0.0.0.0",
                "listen_address": "0.0.0.0:9080",
                "client_address": "127.0.0.1:9080",
            },
        ]
        names = virtual_names(rows)
        self.assertEqual(names, {"db.test": ip_address("10.107.0.2")})
        address = names["db.test"]
        self.assertEqual(resolves_check("db.test", address, ["10.107.0.2"]).state, PASS)
        wrong = resolves_check("db.test", address, ["192.0.2.1"])
        self.assertEqual(wrong.state, FAIL)
        self.assertIn("192.0.2.1", wrong.detail)


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
