"""
Tests for reloading the configuration: L{ngrokd.reconfigure} (what a change
means), L{ngrokd.control.watcher} (when to reload) and L{Daemon.reload}
(applying it to a running daemon, with real sockets and the devcloud).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ngrokd import reload as reload_module
from ngrokd.config import ConfigError, default_config
from ngrokd.control.configfile import store_api_key
from ngrokd.control.watcher import QUIET, ConfigWatcher
from ngrokd.daemon import Daemon
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.reconfigure import HOT, applied, changes, settings
from ngrokd.reload import READ_TIMEOUT, ReloadResult
from ngrokd.test.helpers import (
    Recorder,
    connect,
    exchange,
    offline_twistd,
    source_file,
    spawn_twistd,
    wait_until,
)
from ngrokd.test.test_control import DaemonFixture, replace_lines

ECHO = parse_endpoint_url("tcp://echo.test:7000").url
WEB = parse_endpoint_url("http://web.test").url


def _config(**sections: dict[str, Any]) -> Any:
    config = default_config("/etc/ngrokd/config.yml", {}, "linux").config
    for name, values in sections.items():
        config = attrs.evolve(
            config, **{name: attrs.evolve(getattr(config, name), **values)}
        )
    return config


class ChangesTests(SynchronousTestCase):
    """
    L{changes} and L{applied}: hot keys apply, restart-only keys wait.
    """

    def test_split(self) -> None:
        """
        Each changed key lands on its side, by its config file name.
        """
        running = _config()
        loaded = _config(
            net={"start_port": 9180, "interface_name": "other0"},
            ingress={"endpoint": "elsewhere:443", "connect_timeout": 3.0},
        )
        found = changes(running, loaded)
        self.assertEqual(
            (sorted(found.hot), sorted(found.restart)),
            (
                ["ingress.connect_timeout", "net.start_port"],
                ["ingressEndpoint", "net.interface_name"],
            ),
        )
        self.assertFalse(changes(running, running))

    def test_appliedKeepsRestartOnly(self) -> None:
        """
        The configuration run after a reload has the new hot values and the
        old restart-only ones.
        """
        running = _config()
        loaded = _config(
            net={"start_port": 9180, "interface_name": "other0"},
            server={"log_level": "debug"},
        )
        result = applied(running, loaded)
        self.assertEqual(
            (result.net.start_port, result.net.interface_name),
            (9180, running.net.interface_name),
        )
        self.assertEqual(result.server.log_level, "debug")
        self.assertFalse(changes(result, loaded).hot)

    def test_secretNotShown(self) -> None:
        """
        A changed API key is named, never shown.
        """
        found = changes(_config(api={"key": "old-secret"}), _config(api={"key": "s3"}))
        self.assertEqual(found.described(), ["api.key changed"])
        restart = changes(_config(), _config(net={"interface_name": "x0"}))
        self.assertEqual(
            restart.described(), ["net.interface_name: ngrokd0 -> x0 (needs a restart)"]
        )


class DocumentedTests(SynchronousTestCase):
    """
    The configuration reference says, for every key, when a reload applies
    it, and says it right.
    """

    def test_everyKeyListed(self) -> None:
        """
        Each hot key is in the "applied at once" list, every other key in
        the "applied at the next start" list.
        """
        with open(source_file("docs", "configuration.rst")) as f:
            text = " ".join(f.read().split())
        at_once = text.split("**Applied at once**", 1)[1].split("**", 1)[0]
        at_start = text.split("**Applied at the next start**", 1)[1].split(". ", 1)[0]
        listed_hot = set(re.findall(r"``([\w.]+)``", at_once))
        listed_restart = set(re.findall(r"``([\w.]+)``", at_start))
        keys = set(settings(_config()))
        self.assertEqual(listed_hot, HOT)
        self.assertEqual(listed_restart, keys - HOT)


class Counter:
    """
    A reload that counts its calls and records the file it saw.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: list[str] = []

    def __call__(self) -> Deferred[None]:
        with open(self.path) as f:
            self.seen.append(f.read())
        return succeed(None)


class WatcherTests(TestCase):
    """
    L{ConfigWatcher} with real inotify on real files.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "config.yml")
        with open(self.path, "w") as f:
            f.write("net:\n  start_port: 9080\n")
        self.reloads = Counter(self.path)
        if not sys.platform.startswith("linux"):
            self.skipTest("inotify is Linux-only")
        watcher = ConfigWatcher(self.path, self.reloads, reactor, handle_sighup=False)
        watcher.startService()
        self.addCleanup(watcher.stopService)

    def settle(self) -> Deferred[None]:
        return deferLater(reactor, QUIET * 3, lambda: None)

    def test_renameSaveReloadsOnce(self) -> Deferred[None]:
        """
        A save the way vim does it (a new file written, closed, renamed over
        the old one, with a backup beside it) is one reload of the new text.
        """

        async def run() -> None:
            os.rename(self.path, self.path + "~")
            with open(self.path + ".swp", "w") as f:
                f.write("net:\n  start_port: 9180\n")
            os.rename(self.path + ".swp", self.path)
            os.unlink(self.path + "~")
            await self.settle()
            self.assertEqual(self.reloads.seen, ["net:\n  start_port: 9180\n"])

        return ensureDeferred(run())

    def test_halfWrittenNotRead(self) -> Deferred[None]:
        """
        A file still being written is not read; once its writer closes it,
        it is reloaded once, whole.
        """

        async def run() -> None:
            f = open(self.path, "w")  # noqa: SIM115 (held open on purpose)
            self.addCleanup(f.close)
            f.write("net:\n")
            f.flush()
            await self.settle()
            self.assertEqual(self.reloads.seen, [])
            f.write("  start_port: 9180\n")
            f.close()
            await self.settle()
            self.assertEqual(self.reloads.seen, ["net:\n  start_port: 9180\n"])

        return ensureDeferred(run())

    def test_otherFilesIgnored(self) -> Deferred[None]:
        """
        Files beside the config do not reload it.
        """

        async def run() -> None:
            with open(os.path.join(self.directory, "other.yml"), "w") as f:
                f.write("x")
            await self.settle()
            self.assertEqual(self.reloads.seen, [])

        return ensureDeferred(run())


class SymlinkWatcherTests(TestCase):
    """
    L{ConfigWatcher}, real inotify, on a config that is a symbolic link to
    a file elsewhere (one that configuration management owns).
    """

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            self.skipTest("inotify is Linux-only")
        base = os.path.abspath(self.mktemp())
        self.managed = os.path.join(base, "managed", "ngrokd.yml")
        os.makedirs(os.path.dirname(self.managed))
        with open(self.managed, "w") as f:
            f.write("net:\n  start_port: 9080\n")
        self.path = os.path.join(base, "etc", "config.yml")
        os.makedirs(os.path.dirname(self.path))
        os.symlink(self.managed, self.path)
        self.reloads = Counter(self.path)
        watcher = ConfigWatcher(self.path, self.reloads, reactor, handle_sighup=False)
        watcher.startService()
        self.addCleanup(watcher.stopService)

    def test_targetReplaced(self) -> Deferred[None]:
        """
        A save of the file the link names (here by C{ngrokctl set-api-key},
        which writes through the link) reloads it once.
        """

        async def run() -> None:
            await deferLater(reactor, QUIET * 3, lambda: None)
            store_api_key(self.path, "a-key")
            await deferLater(reactor, QUIET * 3, lambda: None)
            self.assertEqual(len(self.reloads.seen), 1)
            self.assertIn('key: "a-key"', self.reloads.seen[0])
            self.assertTrue(os.path.islink(self.path))

        return ensureDeferred(run())


class PollingWatcherTests(SynchronousTestCase):
    """
    Without inotify the file is polled.
    """

    def test_changeSeen(self) -> None:
        """
        A changed file is reloaded once, after the next poll and the quiet
        time; an unchanged one never.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("a: 1\n")
        reloads = Counter(path)
        clock = Clock()
        watcher = ConfigWatcher(
            path, reloads, clock, use_inotify=False, handle_sighup=False
        )
        watcher.startService()
        self.addCleanup(watcher.stopService)
        clock.pump([1.0] * 5)
        self.assertEqual(reloads.seen, [])
        with open(path, "w") as f:
            f.write("a: 22\n")
        clock.pump([1.0] * 5)
        self.assertEqual(reloads.seen, ["a: 22\n"])


class ReadTimeoutTests(SynchronousTestCase):
    """
    A reload whose read of the config file does not end.
    """

    def test_hungReadRefused(self) -> None:
        """
        A read that takes longer than L{READ_TIMEOUT} seconds on the daemon's
        clock refuses the reload with the reason, and the daemon keeps its
        configuration.
        """
        release = threading.Event()
        self.addCleanup(release.set)

        def hanging(path: str, instance: str | None = None) -> Any:
            release.wait(30)
            raise ConfigError("read at last")

        self.patch(reload_module, "load_config", hanging)
        config, clock = _config(), Clock()
        daemon = Daemon(config, reactor, clock=clock)
        reloaded = daemon.reload()
        self.assertNoResult(reloaded)
        clock.advance(READ_TIMEOUT)
        error = f"{config.path}: not read within 30s"
        self.assertEqual(self.successResultOf(reloaded), ReloadResult(error=error))
        self.assertEqual((daemon.config, daemon.config_error), (config, error))


class DaemonReloadTests(DaemonFixture, TestCase):
    """
    L{Daemon.reload} on a daemon serving the devcloud's endpoints in network
    mode on 127.0.0.1.
    """

    def setUp(self) -> None:
        self.devcloud = self.start_devcloud(self)
        # The file says what the fixture runs with, so a reload sees no
        # change but the test's.
        self.socket = self.own_config(self, self.devcloud)
        with open(self.devcloud.config_path) as f:
            self.original = f.read()

    async def started(self) -> Daemon:
        return await self.start_daemon(self, self.devcloud, self.socket)

    def rewrite(self, **lines: str) -> None:
        """
        Save the config, by rename, with the line of each C{key} replaced.
        """
        text = replace_lines(self.original, **lines)
        with open(self.devcloud.config_path + ".new", "w") as f:
            f.write(text)
        os.rename(self.devcloud.config_path + ".new", self.devcloud.config_path)

    async def echo(self, client: Recorder, data: bytes, sent: bytes = b"") -> None:
        """
        Send C{data} and wait until everything sent so far (C{sent}, then
        C{data}) has come back.
        """
        client.transport.write(data)
        await wait_until(
            lambda: client.received == sent + data, f"{sent + data!r} echoed"
        )

    def test_rebindKeepsConnections(self) -> Deferred[None]:
        """
        Moving one endpoint to another address rebinds only its listener:
        a connection it accepted before moves data before, during and after
        the rebind without losing a byte, new connections reach the new
        address, and the other endpoint keeps its very socket.
        """

        async def run() -> None:
            daemon = await self.started()
            listeners = daemon.listeners.listeners
            web_port = listeners[WEB].port
            old = listeners[ECHO].spec
            client = Recorder()
            await connect(old.port, client)
            await self.echo(client, b"before ")
            start_port = daemon.config.net.start_port
            self.rewrite(
                start_port=f'  overrides: {{echo.test: "127.0.0.2"}}\n'
                f"  start_port: {start_port}"
            )
            reloading = daemon.reload()
            client.transport.write(b"during ")  # while the reload runs
            result = await reloading
            self.assertEqual(result.applied, ("net.overrides",))
            await self.echo(client, b"after", sent=b"before during ")
            self.assertEqual(client.received, b"before during after")
            self.assertEqual(listeners[ECHO].spec.address, "127.0.0.2")
            self.assertIs(listeners[WEB].port, web_port)
            fresh = Recorder()
            await connect(listeners[ECHO].spec.port, fresh, "127.0.0.2")
            await self.echo(fresh, b"new")
            fresh.transport.loseConnection()
            client.transport.loseConnection()

        return ensureDeferred(run())

    def test_poolResized(self) -> Deferred[None]:
        """
        A new pool size applies at once: with 0, the warm connection is
        closed and the ingress holds nothing but the connections carrying
        data.
        """

        async def run() -> None:
            daemon = await self.started()
            port = daemon.listeners.listeners[ECHO].spec.port
            self.assertEqual((await exchange(port, b"hi")).received, b"hi")
            pool = daemon.connector.pool
            await wait_until(lambda: pool.ready == 1, "a warm connection")
            self.rewrite(upgrade_timeout="  upgrade_timeout: 10\n  pool_size: 0")
            result = await daemon.reload()
            self.assertEqual(result.applied, ("ingress.pool_size",))
            self.assertEqual(pool.ready, 0)
            ingress = self.devcloud.ingress
            await wait_until(lambda: ingress.active == ingress.carrying, "closed")
            self.assertEqual((await exchange(port, b"again")).received, b"again")
            self.assertEqual(pool.ready + pool.dialing, 0)

        return ensureDeferred(run())

    def test_invalidRefused(self) -> Deferred[None]:
        """
        An invalid file changes nothing: the reason names the line and key,
        status shows it, and the endpoints keep serving.
        """

        async def run() -> None:
            daemon = await self.started()
            self.rewrite(start_port="  start_port: nope")
            result = await daemon.reload()
            self.assertIn("net.start_port", result.error)
            self.assertIn(result.error, daemon.daemon_status().config_error)
            client = Recorder()
            await connect(daemon.listeners.listeners[ECHO].spec.port, client)
            await self.echo(client, b"still here")
            client.transport.loseConnection()

        return ensureDeferred(run())

    def test_restartOnlyReported(self) -> Deferred[None]:
        """
        A key that needs a restart is reported by name and not applied; the
        hot keys of the same edit are.
        """

        async def run() -> None:
            daemon = await self.started()
            self.rewrite(
                poll_interval="  poll_interval: 7",
                listen_interface="  listen_interface: 127.0.0.1\n"
                "  interface_name: other0",
            )
            result = await daemon.reload()
            self.assertEqual(
                (result.applied, result.restart, result.error),
                (("bound_endpoints.poll_interval",), ("net.interface_name",), ""),
            )
            self.assertEqual(daemon.config.net.interface_name, "ngrokd0")
            self.assertEqual(daemon.discovery.interval, 7.0)
            self.assertEqual(
                daemon.daemon_status().restart_pending, ("net.interface_name",)
            )

        return ensureDeferred(run())


class SighupTests(DaemonFixture, TestCase):
    """
    C{twistd -n ngrokd} as a process: SIGHUP reloads and never stops it.
    """

    def test_sighupStormOneReload(self) -> Deferred[None]:
        """
        200 SIGHUPs sent 10 ms apart are one reload, once they stop coming,
        as a burst of saves of the file is.
        """
        devcloud = self.start_devcloud(self)
        self.own_config(self, devcloud)
        log = os.path.abspath(self.mktemp())
        process = spawn_twistd(self, devcloud.config_path, log)

        async def run() -> None:
            await wait_until(
                lambda: _read(log).count("listening for ") == 2,
                "the listeners",
                timeout=30,
            )
            for _ in range(200):
                process.send_signal(signal.SIGHUP)
                time.sleep(0.01)
            await wait_until(lambda: "has no changes" in _read(log), "a reload")
            # Long enough for any reload still to come to begin.
            await deferLater(reactor, 4 * QUIET, lambda: None)
            self.assertIsNone(process.poll(), _read(log)[-3000:])
            self.assertEqual(
                _read(log).count("reloading the configuration: SIGHUP"),
                1,
                _read(log)[-3000:],
            )

        return ensureDeferred(run())

    def test_sighupReloads(self) -> Deferred[None]:
        """
        After an edit and SIGHUP, the running process serves the endpoint
        where the new file says; it is still running, and stops on SIGTERM.
        """
        devcloud = self.start_devcloud(self)
        socket_path = self.own_config(self, devcloud)
        with open(devcloud.config_path) as f:
            text = f.read()
        log = os.path.abspath(self.mktemp())
        process = spawn_twistd(self, devcloud.config_path, log)

        def output() -> str:
            with open(log, errors="replace") as f:
                return f.read()[-3000:]

        async def listed() -> dict[str, Any]:
            from ngrokd.test.test_ctl import ngrokctl

            ran = await ngrokctl(socket_path, "list", "-o", "json")
            if ran.code != 0:
                return {}
            return {row["url"]: row for row in ran.json()}

        async def run() -> None:
            rows: dict[str, Any] = {}
            deadline = time.monotonic() + 30
            while len(rows) < 2 or any(
                r["state"] != "listening" for r in rows.values()
            ):
                self.assertLess(time.monotonic(), deadline, output())
                self.assertIsNone(process.poll(), output())
                await deferLater(reactor, 0.2, lambda: None)
                rows = await listed()
            edited = text.replace(
                "  start_port:", '  overrides: {echo.test: "127.0.0.2"}\n  start_port:'
            )
            with open(devcloud.config_path, "w") as f:
                f.write(edited)
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while (
                not rows.get("tcp://echo.test:7000", {})
                .get("listen_address", "")
                .startswith("127.0.0.2:")
            ):
                self.assertLess(time.monotonic(), deadline, output())
                await deferLater(reactor, 0.2, lambda: None)
                rows = await listed()
            self.assertIsNone(process.poll())
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while process.poll() is None:
                self.assertLess(time.monotonic(), deadline, "no exit after SIGTERM")
                await deferLater(reactor, 0.1, lambda: None)
            # twistd ends by the signal it stopped for, as systemd expects.
            self.assertEqual(process.returncode, -signal.SIGTERM, output())

        return ensureDeferred(run())


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


class FifoConfigTests(TestCase):
    """
    C{twistd -n ngrokd} as a process whose config file is replaced by a
    FIFO: nothing ever writes to it, so opening it to read would wait
    forever.
    """

    def test_fifoRefusedAndStopPrompt(self) -> Deferred[None]:
        """
        The reload the replacement sets off, C{ngrokctl reload} and SIGHUP
        each refuse the FIFO, naming the path; the process keeps answering,
        and SIGTERM stops it.
        """
        from ngrokd.test.test_ctl import ngrokctl

        process, log, socket_path = offline_twistd(self)
        base = os.path.dirname(log)
        config = os.path.join(base, "config.yml")

        def output() -> str:
            with open(log, errors="replace") as f:
                return f.read()

        async def run() -> None:
            await wait_until(
                lambda: (
                    "waiting for an API key" in output() or process.poll() is not None
                ),
                "the daemon's start",
                timeout=30,
            )
            self.assertIsNone(process.poll(), output())
            fifo = os.path.join(base, "config.fifo")
            os.mkfifo(fifo)
            os.replace(fifo, config)
            refused = f"{config}: cannot read the config file: not a regular file"
            await wait_until(lambda: refused in output(), "the watcher's reload")
            ran = await ngrokctl(socket_path, "reload")
            self.assertEqual((ran.code, ran.out), (1, ""), ran.err)
            self.assertIn(refused, ran.err)
            process.send_signal(signal.SIGHUP)
            await wait_until(lambda: output().count(refused) >= 3, "SIGHUP's reload")
            process.send_signal(signal.SIGTERM)
            await wait_until(lambda: process.poll() is not None, "the stop", 30)
            self.assertEqual(process.returncode, -signal.SIGTERM, output())

        return ensureDeferred(run())
