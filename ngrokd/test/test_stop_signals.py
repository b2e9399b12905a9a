"""
Tests for L{ngrokd.signals.StopOnSignal} on a real C{twistd -n ngrokd}:
signals in quick succession, in bursts and during the start stop it
cleanly, ending by the signal it stopped for; a second signal ends the
grace of open connections at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from ngrokd.test.helpers import Recorder, offline_twistd, spawn_twistd, wait_until
from ngrokd.test.test_control import DaemonFixture
from ngrokd.test.test_ctl import ngrokctl

#: Seconds a process gets to start, and to stop.
PROCESS_TIMEOUT = 30.0
#: Processes each test starts and stops.
ROUNDS = 3


class Run:
    """
    One C{twistd -n ngrokd} process and where it logs.
    """

    def __init__(
        self, process: subprocess.Popen[bytes], log: str, socket_path: str
    ) -> None:
        self.process = process
        self.log = log
        self.socket_path = socket_path

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def send(self, *numbers: int) -> None:
        for number in numbers:
            os.kill(self.process.pid, number)

    async def stopped(self) -> int:
        """
        The process's exit status, once it has ended.
        """
        await wait_until(
            lambda: self.process.poll() is not None, "the stop", PROCESS_TIMEOUT
        )
        return self.process.returncode


class OfflineSignalTests(TestCase):
    """
    A daemon waiting for an API key, stopped by signals.
    """

    def start(self) -> Run:
        return Run(*offline_twistd(self))

    async def started(self) -> Run:
        """
        A daemon whose reactor runs: it answers C{ngrokctl status}.
        """
        run = self.start()
        for _ in range(int(PROCESS_TIMEOUT / 0.1)):
            self.assertIsNone(run.process.poll(), run.output())
            if (await ngrokctl(run.socket_path, "status")).out:
                return run
            await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"no answer from the daemon\n{run.output()}")

    def assertCleanStop(
        self, run: Run, status: int, number: int, running: bool = True
    ) -> None:
        """
        The process ended by signal C{number} after a clean stop: its
        control socket removed, twistd's last line written, no traceback;
        when it was C{running} (past its start), the daemon's handler took
        the signal.
        """
        output = run.output()
        self.assertEqual(status, -number, output)
        self.assertFalse(os.path.exists(run.socket_path), output)
        self.assertIn("Server Shut Down.", output)
        self.assertNotIn("Traceback", output)
        if running:
            name = signal.Signals(number).name
            self.assertIn(f"send {name} again to reset open connections", output)

    def test_twoSignals(self) -> Deferred[None]:
        """
        Two SIGTERMs in quick succession (or SIGTERM then SIGINT) stop the
        daemon cleanly; it ends by the signal it handled first (Python
        handles signals that arrive together in the order of their numbers,
        SIGINT first).
        """

        async def run() -> None:
            for second in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
                daemon = await self.started()
                daemon.send(signal.SIGTERM, second)
                status = await daemon.stopped()
                self.assertIn(status, (-signal.SIGTERM, -second))
                self.assertCleanStop(daemon, status, -status)

        return ensureDeferred(run())

    def test_burst(self) -> Deferred[None]:
        """
        A burst of a hundred SIGTERMs and SIGINTs stops the daemon cleanly;
        it ends by the signal it handled first.
        """

        async def run() -> None:
            for _ in range(ROUNDS):
                daemon = await self.started()
                daemon.send(*[signal.SIGTERM, signal.SIGINT] * 50)
                status = await daemon.stopped()
                self.assertIn(status, (-signal.SIGTERM, -signal.SIGINT))
                self.assertCleanStop(daemon, status, -status)

        return ensureDeferred(run())

    def test_duringStart(self) -> Deferred[None]:
        """
        Two SIGTERMs sent as soon as the control socket appears, while the
        daemon is still starting, stop it as cleanly: the socket is
        removed, not left behind by a process killed before it could.
        """

        async def run() -> None:
            for _ in range(ROUNDS):
                daemon = self.start()
                deadline = time.monotonic() + PROCESS_TIMEOUT
                while not os.path.exists(daemon.socket_path):
                    self.assertLess(time.monotonic(), deadline, daemon.output())
                    self.assertIsNone(daemon.process.poll(), daemon.output())
                    time.sleep(0.0005)
                daemon.send(signal.SIGTERM, signal.SIGTERM)
                status = await daemon.stopped()
                self.assertCleanStop(daemon, status, signal.SIGTERM, running=False)

        return ensureDeferred(run())


class GraceSignalTests(DaemonFixture, TestCase):
    """
    A daemon with an open connection, stopped by two signals.
    """

    def test_secondSignalEndsGrace(self) -> Deferred[None]:
        """
        With a connection open, the first SIGTERM starts the grace (here
        300 s), and a second ends it at once: the daemon resets the
        connection, stops, and ends by SIGTERM.
        """
        devcloud = self.start_devcloud(self)
        socket_path = self.own_config(
            self, devcloud, log_level="  log_level: info\n  shutdown_grace: 300"
        )
        log = os.path.abspath(self.mktemp())
        process = spawn_twistd(self, devcloud.config_path, log)
        daemon = Run(process, log, socket_path)

        async def echo_address() -> tuple[str, int] | None:
            self.assertIsNone(process.poll(), daemon.output())
            ran = await ngrokctl(socket_path, "list", "-o", "json")
            rows: list[dict[str, Any]] = ran.json() if ran.code == 0 else []
            for row in rows:
                if row["url"] == "tcp://echo.test:7000" and row["state"] == "listening":
                    host, _, port = row["listen_address"].rpartition(":")
                    return host, int(port)
            return None

        async def run() -> None:
            address = None
            for _ in range(int(PROCESS_TIMEOUT / 0.2)):
                address = await echo_address()
                if address is not None:
                    break
                await deferLater(reactor, 0.2, lambda: None)
            self.assertIsNotNone(address, daemon.output())
            assert address is not None
            client = Recorder()
            await connectProtocol(TCP4ClientEndpoint(reactor, *address), client)
            self.addCleanup(client.transport.abortConnection)
            client.transport.write(b"ping")
            await wait_until(lambda: client.received == b"ping", "the echo")
            daemon.send(signal.SIGTERM)
            await wait_until(
                lambda: "open connections have 300" in daemon.output(),
                "the grace",
                PROCESS_TIMEOUT,
            )
            daemon.send(signal.SIGTERM)
            self.assertEqual(await daemon.stopped(), -signal.SIGTERM, daemon.output())
            self.assertIn(
                "received SIGTERM again: resetting open connections", daemon.output()
            )
            self.assertFalse(os.path.exists(socket_path))
            await client.lost

        return ensureDeferred(run())
