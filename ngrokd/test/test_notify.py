"""
Tests for L{ngrokd.control.notify}: the sd_notify messages, received on a
real UNIX datagram socket the test binds, as systemd would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import uuid

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ngrokd.control.notify import (
    START_WAIT,
    STATUS_INTERVAL,
    SystemdNotifier,
    notify_address,
    status_text,
    wants_ready,
    watchdog_interval,
)
from ngrokd.ngrok.identity_service import WAITING_FOR_KEY
from ngrokd.status import DaemonStatus
from ngrokd.test.helpers import ready_status, wait_until
from ngrokd.test.test_control import DaemonFixture
from ngrokd.test.test_discovery import capture_logs

READY = ready_status()
STARTING = ready_status(
    identity_state="registering",
    operator_id="",
    polled=False,
    endpoints=0,
    listeners_planned=0,
    listeners_up=0,
)


def systemd_socket(case: SynchronousTestCase) -> tuple[socket.socket, str]:
    """
    A datagram socket bound where C{NOTIFY_SOCKET} will point, in a short
    directory (socket paths are limited to about 100 bytes).
    """
    directory = tempfile.mkdtemp(prefix="ngrokd-notify-")
    case.addCleanup(shutil.rmtree, directory, True)
    path = os.path.join(directory, "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    case.addCleanup(listener.close)
    listener.bind(path)
    listener.setblocking(False)
    return listener, path


def received(listener: socket.socket) -> list[str]:
    """
    The messages waiting on C{listener}, oldest first.
    """
    found = []
    while True:
        try:
            found.append(listener.recv(4096).decode("utf-8"))
        except BlockingIOError:
            return found


class PureTests(SynchronousTestCase):
    """
    Reading the environment and choosing what to say.
    """

    def test_address(self) -> None:
        """
        A path is used as it is, C{@name} is the abstract namespace, and
        anything else (unset, or not a UNIX socket) disables notifying.
        """
        self.assertEqual(notify_address("/run/systemd/notify"), "/run/systemd/notify")
        self.assertEqual(notify_address("@sd"), "\0sd")
        self.assertIsNone(notify_address(""))
        self.assertIsNone(notify_address("vsock:2:1234"))

    def test_watchdogInterval(self) -> None:
        """
        Pings go at half of C{WATCHDOG_USEC}, only for the process that
        C{WATCHDOG_PID} names when it names one.
        """
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7), 15.0)
        self.assertEqual(
            watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "7"}, 7),
            2.0,
        )
        self.assertIsNone(
            watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "8"}, 7)
        )
        self.assertIsNone(watchdog_interval({}, 7))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "0"}, 7))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "soon"}, 7))

    def test_readyWhenWaitingForAKey(self) -> None:
        """
        A ready daemon, and one that waits for an API key, let systemd
        finish the start; one still registering does not, until it has
        tried for START_WAIT seconds.
        """
        self.assertTrue(wants_ready(READY, 0.0))
        self.assertTrue(
            wants_ready(attrs.evolve(STARTING, identity_state=WAITING_FOR_KEY), 0.0)
        )
        self.assertFalse(wants_ready(STARTING, START_WAIT - 1))
        self.assertTrue(wants_ready(STARTING, START_WAIT))

    def test_statusText(self) -> None:
        """
        The status line says ready or why not, with the counts.
        """
        self.assertEqual(status_text(READY), "ready: 2 endpoints, 2 of 2 listeners up")
        self.assertEqual(
            status_text(STARTING),
            "not ready: registering; 0 endpoints, 0 of 0 listeners up",
        )


class NotifierTests(SynchronousTestCase):
    """
    The notifier on a fake clock, sending to a real socket.
    """

    def notifier(
        self, status: list[DaemonStatus], **environ: str
    ) -> tuple[SystemdNotifier, Clock]:
        clock = Clock()
        notifier = SystemdNotifier(lambda: status[0], clock, environ, pid=7)
        notifier.startService()

        def stop() -> None:
            if notifier.running:
                notifier.stopService()

        self.addCleanup(stop)
        return notifier, clock

    def test_unset(self) -> None:
        """
        Without C{NOTIFY_SOCKET} nothing is scheduled or sent.
        """
        notifier, clock = self.notifier([READY])
        self.assertFalse(notifier.enabled)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_readyOnceStatusOnChange(self) -> None:
        """
        C{READY=1} goes once, with the status; a status goes again only
        when it changes, and at most once a C{STATUS_INTERVAL}.
        """
        listener, path = systemd_socket(self)
        status = [STARTING]
        notifier, clock = self.notifier(status, NOTIFY_SOCKET=path)
        self.assertEqual(
            received(listener),
            ["STATUS=not ready: registering; 0 endpoints, 0 of 0 listeners up"],
        )
        clock.advance(STATUS_INTERVAL)
        self.assertEqual(received(listener), [])
        status[0] = READY
        self.assertEqual(received(listener), [])
        clock.advance(STATUS_INTERVAL)
        self.assertEqual(
            received(listener),
            ["READY=1\nSTATUS=ready: 2 endpoints, 2 of 2 listeners up"],
        )
        status[0] = attrs.evolve(READY, listeners_up=1)
        clock.advance(STATUS_INTERVAL)
        status[0] = READY
        clock.advance(STATUS_INTERVAL)
        self.assertEqual(
            received(listener),
            [
                "STATUS=not ready: 1 of 2 listeners are up;"
                " 2 endpoints, 1 of 2 listeners up",
                "STATUS=ready: 2 endpoints, 2 of 2 listeners up",
            ],
        )
        notifier.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_startDoneWhenNotReady(self) -> None:
        """
        A daemon that stays not ready (one endpoint's port is taken) tells
        systemd the start is done after START_WAIT seconds, with what is
        missing, so that systemd does not time the start out and restart a
        daemon that serves the other endpoints; it says so in its log.
        """
        listener, path = systemd_socket(self)
        partly = attrs.evolve(READY, listeners_up=1)
        notifier, clock = self.notifier([partly], NOTIFY_SOCKET=path)
        logged = capture_logs(self)
        received(listener)
        clock.advance(START_WAIT - STATUS_INTERVAL)
        self.assertEqual(received(listener), [])
        clock.advance(STATUS_INTERVAL)
        self.assertEqual(
            received(listener),
            ["READY=1"],
        )
        (event,) = [e for e in logged if "start is done" in e["log_format"]]
        self.assertEqual(event["why"], "1 of 2 listeners are up")

    def test_watchdog(self) -> None:
        """
        With C{WATCHDOG_USEC}, C{WATCHDOG=1} goes at half of it.
        """
        listener, path = systemd_socket(self)
        notifier, clock = self.notifier(
            [READY], NOTIFY_SOCKET=path, WATCHDOG_USEC="10000000"
        )
        self.assertIn("WATCHDOG=1", received(listener))
        clock.advance(4.0)
        self.assertNotIn("WATCHDOG=1", received(listener))
        clock.advance(1.0)
        self.assertIn("WATCHDOG=1", received(listener))

    def test_abstractNamespace(self) -> None:
        """
        C{@name} reaches a socket bound in the abstract namespace.
        """
        name = f"ngrokd-test-{uuid.uuid4().hex}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(listener.close)
        listener.bind("\0" + name)
        listener.setblocking(False)
        self.notifier([READY], NOTIFY_SOCKET="@" + name)
        self.assertEqual(
            received(listener),
            ["READY=1\nSTATUS=ready: 2 endpoints, 2 of 2 listeners up"],
        )

    def test_nobodyListens(self) -> None:
        """
        A socket nobody listens on is logged once, and the daemon goes on.
        """
        directory = tempfile.mkdtemp(prefix="ngrokd-notify-")
        self.addCleanup(shutil.rmtree, directory, True)
        logged = capture_logs(self)
        status = [STARTING]
        notifier, clock = self.notifier(
            status, NOTIFY_SOCKET=os.path.join(directory, "gone")
        )
        status[0] = READY
        clock.advance(STATUS_INTERVAL)
        notifier.stopping()
        warnings = [e for e in logged if "cannot notify systemd" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["error"], "ENOENT")
        self.assertTrue(notifier.running)


class DaemonNotifyTests(DaemonFixture, TestCase):
    """
    A daemon built as twistd builds it, against the devcloud, notifying a
    socket the test owns.
    """

    def test_readyStatusStopping(self) -> Deferred[None]:
        """
        The daemon says READY=1 with its status once its listeners are up,
        pings the watchdog, and says STOPPING=1 when it stops, in that order.
        """

        async def run() -> None:
            devcloud = self.start_devcloud(self)
            listener, path = systemd_socket(self)
            sock = os.path.join(self.socket_dir(self), "ngrokd.sock")
            daemon = await self.start_daemon(
                self,
                devcloud,
                sock,
                environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"},
            )
            seen: list[str] = []

            def has(line: str) -> bool:
                seen.extend(received(listener))
                return any(line in message.splitlines() for message in seen)

            await wait_until(lambda: has("READY=1"), "READY=1")
            await wait_until(lambda: has("WATCHDOG=1"), "a watchdog ping")
            await daemon.stopService()
            self.assertTrue(has("STOPPING=1"))
            lines = [line for message in seen for line in message.splitlines()]
            lines = [line for line in lines if line != "WATCHDOG=1"]
            ready = lines.index("READY=1")
            self.assertEqual(
                lines[ready + 1], "STATUS=ready: 2 endpoints, 2 of 2 listeners up"
            )
            self.assertEqual(lines[-1], "STOPPING=1")
            self.assertEqual(lines.count("READY=1"), 1)

        return ensureDeferred(run())

    def test_readyWithoutKey(self) -> Deferred[None]:
        """
        A daemon without an API key tells systemd it has started, with a
        status that says it waits for a key.
        """

        async def run() -> None:
            devcloud = self.start_devcloud(self)
            with open(devcloud.config_path) as f:
                original = f.read()
            key_line = f"  key: {json.dumps(devcloud.api_key)}\n"
            self.assertIn(key_line, original)
            keyless = os.path.join(devcloud.state_dir, "keyless.yml")
            with open(keyless, "w") as f:
                f.write(original.replace(key_line, '  key: ""\n'))
            listener, path = systemd_socket(self)
            sock = os.path.join(self.socket_dir(self), "ngrokd.sock")
            await self.start_daemon(
                self,
                devcloud,
                sock,
                keyless,
                expected=0,
                environ={"NOTIFY_SOCKET": path},
            )
            seen: list[str] = []

            def ready() -> bool:
                seen.extend(received(listener))
                return any("READY=1" in message for message in seen)

            await wait_until(ready, "READY=1")
            (message,) = [m for m in seen if "READY=1" in m]
            self.assertIn(f"STATUS=not ready: {WAITING_FOR_KEY}", message)

        return ensureDeferred(run())
