"""
Tests for L{ngrokd.datapath.descriptors} and the listeners' accept gating:
C{twistd -n ngrokd} as a process with a low limit on open files, carrying
more clients at once than it has descriptors for.
"""

from __future__ import annotations

import os
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from ngrokd.summarylog import SUMMARY_INTERVAL
from ngrokd.test.helpers import exchange, spawn_twistd
from ngrokd.test.test_control import DaemonFixture
from ngrokd.test.test_ctl import ngrokctl

#: The daemon's limit on open files: about twenty carried connections.
OPEN_FILES = 64
#: Clients connecting at once: several times what the limit lets it carry.
CLIENTS = 300


class OpenFileLimitTests(DaemonFixture, TestCase):
    """
    At its open-file limit the daemon leaves connections in the backlog
    rather than accept them and fail them.
    """

    timeout = 120

    def test_clientsBeyondTheLimitAllCarried(self) -> Deferred[None]:
        """
        Many more clients at once than the limit lets the daemon carry are
        all carried: those beyond it wait in the kernel's backlog, none is
        accepted and then failed for want of a descriptor for its ingress
        leg; and the warm pool's dials that fail for want of one make a
        few summarised lines, not one each.
        """
        devcloud = self.start_devcloud(self)
        socket_path = self.own_config(self, devcloud)
        log = os.path.abspath(self.mktemp())
        process = spawn_twistd(self, devcloud.config_path, log, open_files=OPEN_FILES)

        def output() -> str:
            with open(log, errors="replace") as f:
                return f.read()

        async def echo_port() -> int:
            deadline = time.monotonic() + 30
            while True:
                self.assertLess(time.monotonic(), deadline, output()[-3000:])
                self.assertIsNone(process.poll(), output()[-3000:])
                ran = await ngrokctl(socket_path, "list", "-o", "json")
                rows = {row["url"]: row for row in ran.json()} if ran.code == 0 else {}
                row = rows.get("tcp://echo.test:7000", {})
                if row.get("state") == "listening":
                    return int(row["listen_address"].rpartition(":")[2])
                await deferLater(reactor, 0.2, lambda: None)

        async def run() -> None:
            port = await echo_port()
            began = time.monotonic()
            clients = await gatherResults(
                [
                    ensureDeferred(exchange(port, b"client %d" % n))
                    for n in range(CLIENTS)
                ]
            )
            took = time.monotonic() - began
            carried = [c.received == b"client %d" % n for n, c in enumerate(clients)]
            self.assertEqual(carried.count(False), 0, output()[-3000:])
            self.assertIn("open-file limit", output())
            warm_failures = [
                line
                for line in output().splitlines()
                if "warm connection" in line and "failed" in line
            ]
            self.assertLessEqual(
                len(warm_failures), 2 + took / SUMMARY_INTERVAL, output()[-3000:]
            )

        return ensureDeferred(run())
