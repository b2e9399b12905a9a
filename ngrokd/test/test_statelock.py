"""
Tests for L{ngrokd.host.statelock}: one daemon per state directory, with
real processes holding the lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from ipaddress import ip_address

from twisted.trial.unittest import SynchronousTestCase

from ngrokd.host.hostsection import render
from ngrokd.host.statelock import (
    LOCK_FILE,
    StateDirectoryLocked,
    StateLock,
    StateLockError,
)
from ngrokd.test.helpers import offline_config, spawn_twistd

#: Seconds a child process gets to start or stop.
PROCESS_TIMEOUT = 30.0


def wait_for(
    check: Callable[[], bool], what: str, timeout: float = PROCESS_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class StateLockTests(SynchronousTestCase):
    """
    The lock itself, in this process.
    """

    def setUp(self) -> None:
        self.state = os.path.abspath(self.mktemp())

    def test_secondRefusedWithPid(self) -> None:
        """
        A second lock on the same directory is refused, naming the pid the
        holder wrote; once released, it can be taken.
        """
        first = StateLock(self.state)
        first.acquire()
        self.addCleanup(first.release)
        with open(os.path.join(self.state, LOCK_FILE)) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")
        second = StateLock(self.state)
        error = self.assertRaises(StateDirectoryLocked, second.acquire)
        self.assertEqual(error.pid, os.getpid())
        self.assertIn(f"pid {os.getpid()}", str(error))
        self.assertIn(f"holds {self.state}:", str(error))
        self.assertFalse(second.held)
        first.release()
        second.acquire()
        self.addCleanup(second.release)
        self.assertTrue(second.held)

    def test_unusableDirectory(self) -> None:
        """
        A state directory that cannot be made is a clear error naming it.
        """
        with open(self.state, "w"):
            pass
        error = self.assertRaises(StateLockError, StateLock(self.state).acquire)
        self.assertIn(self.state, str(error))


class SecondDaemonTests(SynchronousTestCase):
    """
    A real second daemon process on the same state directory refuses to
    start, naming the first one's pid, and changes nothing.
    """

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.state = os.path.join(base, "state")
        self.hosts = os.path.join(base, "hosts")
        self.config = offline_config(base, os.path.join(base, "ngrokd.sock"))
        self.base = base

    def daemon(self, name: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "NGROK_API_KEY"}
        log = os.path.join(self.base, f"{name}.log")
        return spawn_twistd(self, self.config, log, env=env, cwd=self.base)

    def write_hosts(self, text: str) -> None:
        with open(self.hosts, "w") as f:
            f.write(text)

    def read_hosts(self) -> str:
        with open(self.hosts) as f:
            return f.read()

    def output(self, name: str) -> str:
        with open(os.path.join(self.base, f"{name}.log"), errors="replace") as f:
            return f.read()

    def test_secondDaemonRefuses(self) -> None:
        """
        While one daemon runs, a second on the same state exits 1 saying
        which pid holds it, and leaves the hosts file alone; once the first
        has stopped, the lock is free.
        """
        section = render("127.0.0.1\tlocalhost\n", {"a.test": ip_address("10.107.0.2")})
        self.write_hosts(section)
        first = self.daemon("first")
        # The first daemon removes a section left from before, once started.
        wait_for(lambda: self.read_hosts() != section, "the first daemon's start")
        self.write_hosts(section)
        second = self.daemon("second")
        self.assertEqual(second.wait(PROCESS_TIMEOUT), 1)
        output = self.output("second")
        self.assertIn(f"another ngrokd (pid {first.pid}) holds", output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(self.read_hosts(), section)
        self.assertIsNone(first.poll())
        first.send_signal(signal.SIGTERM)
        first.wait(PROCESS_TIMEOUT)
        lock = StateLock(self.state)
        lock.acquire()
        lock.release()

    def test_lockFileDeleted(self) -> None:
        """
        With the lock file deleted under a running daemon, a second one on
        the same state still refuses, saying another daemon holds it.
        """
        first = self.daemon("first")
        wait_for(lambda: "waiting for an API key" in self.output("first"), "start")
        os.unlink(os.path.join(self.state, LOCK_FILE))
        second = self.daemon("second")
        self.assertEqual(second.wait(PROCESS_TIMEOUT), 1, self.output("second"))
        output = self.output("second")
        self.assertIn(f"another ngrokd (another process) holds {self.state}", output)
        self.assertNotIn("Traceback", output)
        self.assertIsNone(first.poll())
        first.send_signal(signal.SIGTERM)
        first.wait(PROCESS_TIMEOUT)

    def test_killedHolderFreesTheLock(self) -> None:
        """
        A daemon killed with SIGKILL leaves its lock file, but not its lock.
        """
        first = self.daemon("first")
        wait_for(lambda: "waiting for an API key" in self.output("first"), "start")
        first.kill()
        first.wait(PROCESS_TIMEOUT)
        self.assertTrue(os.path.exists(os.path.join(self.state, LOCK_FILE)))
        lock = StateLock(self.state)
        lock.acquire()
        lock.release()
