"""
Tests for C{ngrokctl diagnose} (L{ngrokd.control.diagnose}): the whole walk
against a running daemon and the devcloud, with one hop broken at a time
(the pure checks are in L{ngrokd.test.test_hops}).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from ngrokd.control.client import EXIT_FAILED, EXIT_OK
from ngrokd.control.verdict import PASS
from ngrokd.test.test_control import DaemonFixture
from ngrokd.test.test_ctl import ngrokctl

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
