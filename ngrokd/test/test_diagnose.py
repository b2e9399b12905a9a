"""
Tests for C{ngrokctl diagnose} (L{ngrokd.control.diagnose}): the whole walk
against a running daemon and the devcloud, with one hop broken at a time;
then its parts that read files (L{ngrokd.control.probes},
L{ngrokd.control.namewalk}). The pure checks are in L{ngrokd.test.test_hops}.
"""

from __future__ import annotations

import json
import os
from ipaddress import ip_address
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ngrokd.config import default_config
from ngrokd.control import probes
from ngrokd.control.client import EXIT_FAILED, EXIT_OK
from ngrokd.control.diagnose import Diagnosis
from ngrokd.control.namewalk import NameWalk
from ngrokd.control.verdict import FAIL, PASS, Check
from ngrokd.host.allocation import IPAddress
from ngrokd.test.test_control import DaemonFixture
from ngrokd.test.test_ctl import ngrokctl
from ngrokd.test.threads import at_once

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


class DiagnosisTests(TestCase):
    """
    L{Diagnosis} run on its own.
    """

    def test_brokenConfig(self) -> Deferred[None]:
        """
        A config file that cannot be read is the first and only hop: the
        walk goes no further without it.
        """

        async def run() -> None:
            directory = self.mktemp()
            missing = os.path.join(directory, "ngrokd.yml")
            socket = os.path.join(directory, "ngrokd.sock")
            checks = await Diagnosis(reactor, missing, socket).run()
            self.assertEqual(
                [(c.name, c.state) for c in checks], [("config valid", FAIL)]
            )
            self.assertIn("cannot read the config file", checks[0].detail)

        return ensureDeferred(run())


class ProbeTests(SynchronousTestCase):
    """
    What diagnose reads from this machine's files.
    """

    def test_resolvConf(self) -> None:
        """
        C{resolv.conf} is read with where it links to; one that cannot be
        read reads as empty.
        """
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        target = os.path.join(directory, "stub-resolv.conf")
        with open(target, "w") as f:
            f.write("nameserver 127.0.0.53\n")
        link = os.path.join(directory, "resolv.conf")
        os.symlink(target, link)
        self.assertEqual(probes.resolv_conf(link), (target, "nameserver 127.0.0.53\n"))
        self.assertEqual(
            probes.resolv_conf(os.path.join(directory, "none")), (None, "")
        )

    def test_resolverFiles(self) -> None:
        """
        Each domain's C{/etc/resolver} file is read, C{None} where there is
        none.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        with open(os.path.join(directory, "apps.prod"), "wb") as f:
            f.write(b"nameserver 10.107.0.1\n")
        self.assertEqual(
            probes.resolver_files(directory, ["apps.prod", "web.prod"]),
            {"apps.prod": b"nameserver 10.107.0.1\n", "web.prod": None},
        )


class NameWalkTests(SynchronousTestCase):
    """
    The names' hops that read only files.
    """

    def test_hostsHop(self) -> None:
        """
        The hosts file is read for our section and for lines outside it
        that name our names: a file with neither fails the first, and a
        line of its own for one of our names fails the second.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        hosts = os.path.join(directory, "hosts")
        with open(hosts, "w") as f:
            f.write("127.0.0.1 localhost\n192.0.2.9 web.test\n")
        defaults = default_config(os.path.join(directory, "c.yml"), {}, "linux")
        config = attrs.evolve(
            defaults.config,
            net=attrs.evolve(defaults.config.net, hosts_file=hosts),
        )
        checks: list[Check] = []

        def add(check: Check) -> bool:
            checks.append(check)
            return check.state == PASS

        walk = NameWalk(reactor, at_once, add)
        names: dict[str, tuple[IPAddress, ...]] = {
            "web.test": (ip_address("10.107.0.2"),)
        }
        self.successResultOf(ensureDeferred(walk.hosts(config, names, False)))
        self.assertEqual(
            [(c.name, c.state) for c in checks],
            [
                ("hosts section matches", FAIL),
                ("no hosts line shadows our names", FAIL),
            ],
        )
        self.assertIn("web.test", checks[1].detail)
