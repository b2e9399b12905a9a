"""
Tests for L{ngrokd.control.server}: the control socket over a real UNIX
socket, in front of a real daemon registered with the devcloud.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from types import SimpleNamespace
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.protocols import amp
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from ngrokd.board import StatusBoard
from ngrokd.config import default_config, load_config
from ngrokd.control.commands import (
    PAGE_BYTES,
    Hello,
    ListEndpoints,
    NotPermitted,
    SetAPIKey,
    Status,
)
from ngrokd.control.controller import Controller
from ngrokd.control.feed import EventFeed
from ngrokd.control.legacy import MAX_LEGACY_REQUEST
from ngrokd.control.peer import Peer
from ngrokd.control.server import MAX_CONNECTIONS, ControlService, transport_peer
from ngrokd.daemon import Daemon
from ngrokd.devcloud.tap import RunningDevcloud, start_devcloud
from ngrokd.status import EndpointStatus
from ngrokd.tap import build_daemon
from ngrokd.test.helpers import Echo, Recorder, free_ports, listen, wait_listening


def replace_lines(text: str, **lines: str) -> str:
    """
    C{text}, a config file, with the line of each key (indented in its
    section) replaced by the given lines.
    """
    for key, line in lines.items():
        text, found = re.subn(rf"(?m)^  {key}:.*$", line, text, count=1)
        if found != 1:
            raise AssertionError(f"no line for {key} in the config")
    return text


class DaemonFixture:
    """
    A devcloud with two endpoints and a daemon built as twistd builds it,
    its control socket in a short temporary directory (socket paths are
    limited to about 100 bytes).
    """

    timeout = 60

    def start_devcloud(self, case: TestCase) -> RunningDevcloud:
        echo = listen(Factory.forProtocol(Echo), case)
        devcloud = start_devcloud(
            reactor,
            os.path.abspath(case.mktemp()),
            [
                ("tcp://echo.test:7000", ("127.0.0.1", echo)),
                ("http://web.test", ("127.0.0.1", echo)),
            ],
            start_port=free_ports(16),
        )
        case.addCleanup(devcloud.stop)
        return devcloud

    def own_config(
        self, case: TestCase, devcloud: RunningDevcloud, **lines: str
    ) -> str:
        """
        Make the devcloud's config file say what L{start_daemon} runs with
        (a short socket path of its own, no health server), with the line of
        each key in C{lines} replaced too; the socket's path.
        """
        socket_path = os.path.join(self.socket_dir(case), "ngrokd.sock")
        with open(devcloud.config_path) as f:
            text = f.read()
        own = f"  socket_path: {socket_path}\n  health_address: ''"
        with open(devcloud.config_path, "w") as f:
            f.write(replace_lines(text, socket_path=own, **lines))
        return socket_path

    def socket_dir(self, case: TestCase) -> str:
        directory = tempfile.mkdtemp(prefix="ngrokd-ctl-")
        case.addCleanup(shutil.rmtree, directory, True)
        return directory

    async def start_daemon(
        self,
        case: TestCase,
        devcloud: RunningDevcloud,
        socket_path: str,
        config_path: str | None = None,
        expected: int = 2,
        environ: dict[str, str] | None = None,
        **server: Any,
    ) -> Daemon:
        loaded = load_config(config_path or devcloud.config_path).config
        config = attrs.evolve(
            loaded,
            server=attrs.evolve(
                loaded.server, socket_path=socket_path, health_address="", **server
            ),
        )
        daemon = build_daemon(config, reactor, environ)
        daemon.startService()
        case.addCleanup(daemon.stopService)
        await control_of(daemon).whenListening()
        await wait_listening(daemon, expected)
        return daemon


def control_of(daemon: Daemon) -> ControlService:
    (found,) = [s for s in daemon if isinstance(s, ControlService)]
    return found


async def amp_client(case: TestCase, path: str) -> amp.AMP:
    protocol = await UNIXClientEndpoint(reactor, path).connect(
        Factory.forProtocol(amp.AMP)
    )
    case.addCleanup(protocol.transport.loseConnection)
    return protocol


async def legacy(path: str, request: bytes) -> Any:
    """
    Send one request the original's way; the one JSON line it answers.
    """
    collect = Recorder()
    await UNIXClientEndpoint(reactor, path).connect(
        Factory.forProtocol(lambda: collect)
    )
    collect.transport.write(request)
    await collect.lost
    data = collect.received
    lines = data.splitlines()
    assert len(lines) == 1 and data.endswith(b"\n"), data
    return json.loads(lines[0])


class ControlSocketTests(DaemonFixture, TestCase):
    """
    AMP and the original's JSON protocol on one real socket.
    """

    def setUp(self) -> None:
        self.devcloud = self.start_devcloud(self)
        self.path = os.path.join(self.socket_dir(self), "ngrokd.sock")

    def test_ampStatusAndList(self) -> Deferred[None]:
        """
        Over AMP, C{status} says the daemon is registered and ready, and the
        endpoint list has a row per endpoint with where to connect.
        """

        async def run() -> None:
            daemon = await self.start_daemon(self, self.devcloud, self.path)
            client = await amp_client(self, self.path)
            hello = await client.callRemote(Hello, version=1)
            self.assertIn("set-api-key", hello["commands"])
            status = (await client.callRemote(Status))["status"]
            assert daemon.identity is not None
            self.assertEqual(
                (status["registered"], status["operator_id"], status["endpoints"]),
                (True, daemon.identity.operator_id, 2),
            )
            self.assertEqual(status["config_path"], daemon.config.path)
            page = await client.callRemote(ListEndpoints, cursor=0)
            self.assertIsNone(page.get("next"))
            rows = {row["url"]: row for row in page["endpoints"]}
            self.assertEqual(sorted(rows), ["http://web.test", "tcp://echo.test:7000"])
            row = rows["tcp://echo.test:7000"]
            self.assertEqual(row["state"], "listening")
            self.assertTrue(row["client_address"].startswith("127.0.0.1:"))

        return ensureDeferred(run())

    def test_legacyStatus(self) -> Deferred[None]:
        """
        A script of the original sends C{{"command":"status"}} and gets one
        JSON line with the original's fields.
        """

        async def run() -> None:
            daemon = await self.start_daemon(self, self.devcloud, self.path)
            answer = await legacy(self.path, b'{"command": "status"}\n')
            assert daemon.identity is not None
            self.assertEqual(
                answer,
                {
                    "success": True,
                    "data": {
                        "registered": True,
                        "operator_id": daemon.identity.operator_id,
                        "endpoint_count": 2,
                        "ingress_endpoint": self.devcloud.ingress_endpoint,
                    },
                },
            )

        return ensureDeferred(run())

    def test_legacyList(self) -> Deferred[None]:
        """
        C{list} answers the original's fields for every endpoint; the
        request needs no newline.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.path)
            answer = await legacy(self.path, b'{"command":"list"}')
            self.assertTrue(answer["success"])
            rows = {row["url"]: row for row in answer["data"]}
            row = rows["tcp://echo.test:7000"]
            self.assertEqual(
                set(row),
                {
                    "id",
                    "hostname",
                    "ip",
                    "port",
                    "url",
                    "local_listener",
                    "network_port",
                    "listen_interface",
                },
            )
            self.assertEqual((row["hostname"], row["port"]), ("echo.test", 7000))
            self.assertEqual(row["listen_interface"], "127.0.0.1")
            self.assertEqual(row["local_listener"], f"127.0.0.1:{row['network_port']}")

        return ensureDeferred(run())

    def test_legacyErrors(self) -> Deferred[None]:
        """
        An unknown command, a request that is not JSON and a key-less
        C{set-api-key} each get the original's error answer; a key that
        cannot be one is refused before ngrok is asked.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.path)
            self.assertEqual(
                await legacy(self.path, b'{"command": "reboot"}\n'),
                {"success": False, "error": "unknown command: reboot"},
            )
            answer = await legacy(self.path, b"{nope\n")
            self.assertFalse(answer["success"])
            self.assertTrue(answer["error"].startswith("failed to decode command"))
            self.assertEqual(
                await legacy(self.path, b'{"command": "set-api-key", "args": []}'),
                {"success": False, "error": "API key required"},
            )
            self.assertEqual(
                await legacy(
                    self.path, b'{"command": "set-api-key", "args": ["a\\nb"]}'
                ),
                {
                    "success": False,
                    "error": "refusing the API key: it holds unprintable characters"
                    " or bytes that are not UTF-8",
                },
            )

        return ensureDeferred(run())

    def test_legacyRequestBounded(self) -> Deferred[None]:
        """
        A request longer than the original's protocol allows is answered
        with an error naming the limit, not read without end.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.path)
            request = b'{"command": "' + b"x" * MAX_LEGACY_REQUEST
            self.assertEqual(
                await legacy(self.path, request),
                {
                    "success": False,
                    "error": f"request longer than {MAX_LEGACY_REQUEST} bytes",
                },
            )

        return ensureDeferred(run())

    def test_notWorldWritable(self) -> Deferred[None]:
        """
        The socket is a socket, readable and writable by its owner and group
        only.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.path)
            mode = os.stat(self.path).st_mode
            self.assertTrue(stat.S_ISSOCK(mode))
            self.assertEqual(stat.S_IMODE(mode), 0o660)

        return ensureDeferred(run())

    def test_strangerCannotConnect(self) -> Deferred[None]:
        """
        A user who is neither the socket's owner nor in its group cannot
        connect at all (a child process that becomes C{nobody} tries).
        """
        if os.geteuid() != 0:
            raise SkipTest("becoming another user needs root")

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.path)
            os.chmod(os.path.dirname(self.path), 0o755)
            self.assertEqual(_connect_as(65534, 65534, self.path), errno.EACCES)
            self.assertEqual(_connect_as(0, 0, self.path), 0)

        return ensureDeferred(run())

    def test_silentConnectionClosed(self) -> Deferred[None]:
        """
        A connection that sends nothing (or half a request) is closed after
        the idle timeout, and stops counting against the connection cap.
        """

        async def run() -> None:
            daemon = await self.start_daemon(self, self.devcloud, self.path)
            control = control_of(daemon)
            await control.stopService()
            control.idle_timeout = 0.2
            control.startService()
            await control.whenListening()
            silent = Recorder()
            await UNIXClientEndpoint(reactor, self.path).connect(
                Factory.forProtocol(lambda: silent)
            )
            silent.transport.write(b'{"command": ')
            await silent.lost
            self.assertEqual(silent.received, b"")
            answer = await legacy(self.path, b'{"command": "status"}')
            self.assertTrue(answer["success"])

        return ensureDeferred(run())

    def test_connectionsCapped(self) -> Deferred[None]:
        """
        Beyond L{MAX_CONNECTIONS} open connections, a new one is closed at
        once; the open ones keep working.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.path)
            held = [await amp_client(self, self.path) for _ in range(MAX_CONNECTIONS)]
            extra = Recorder()
            await UNIXClientEndpoint(reactor, self.path).connect(
                Factory.forProtocol(lambda: extra)
            )
            await extra.lost
            status = await held[0].callRemote(Status)
            self.assertTrue(status["status"]["registered"])

        return ensureDeferred(run())

    def test_staleSocketReplaced(self) -> Deferred[None]:
        """
        A socket file left by a daemon that died is replaced.
        """

        async def run() -> None:
            dead = socket.socket(socket.AF_UNIX)
            dead.bind(self.path)
            dead.close()  # the file stays, nothing answers
            await self.start_daemon(self, self.devcloud, self.path)
            answer = await legacy(self.path, b'{"command": "status"}')
            self.assertTrue(answer["success"])

        return ensureDeferred(run())

    def test_liveSocketNotStolen(self) -> Deferred[None]:
        """
        A second control service on the socket of a live one leaves it
        alone and says so; the first keeps answering.
        """

        async def run() -> None:
            daemon = await self.start_daemon(self, self.devcloud, self.path)
            logged: list[str] = []

            @implementer(ILogObserver)
            def observe(event: dict[str, Any]) -> None:
                if event.get("log_level") is not None and "socket" in event:
                    logged.append(event.get("log_format", ""))

            globalLogPublisher.addObserver(observe)
            self.addCleanup(globalLogPublisher.removeObserver, observe)
            feed = EventFeed(daemon.daemon_status, daemon.board, reactor)
            second = ControlService(daemon, feed, reactor)
            second.startService()
            self.addCleanup(second.stopService)
            await second.whenListening()
            self.assertFalse(second.listening)
            self.assertTrue(any("another process answers" in f for f in logged))
            answer = await legacy(self.path, b'{"command": "status"}')
            self.assertTrue(answer["success"])

        return ensureDeferred(run())

    def test_notASocketNotReplaced(self) -> Deferred[None]:
        """
        A regular file at the socket path is never removed.
        """

        async def run() -> None:
            with open(self.path, "w") as f:
                f.write("precious")
            loaded = load_config(self.devcloud.config_path).config
            config = attrs.evolve(
                loaded,
                server=attrs.evolve(
                    loaded.server, socket_path=self.path, health_address=""
                ),
            )
            daemon = build_daemon(config, reactor)
            daemon.startService()
            self.addCleanup(daemon.stopService)
            await control_of(daemon).whenListening()
            self.assertFalse(control_of(daemon).listening)
            with open(self.path) as f:
                self.assertEqual(f.read(), "precious")

        return ensureDeferred(run())


def _connect_as(uid: int, gid: int, path: str) -> int:
    """
    The errno of connecting to C{path} from a child process running as
    C{uid}/C{gid} (0: connected).
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no Twisted, no Python cleanup
        code = 255
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            probe = socket.socket(socket.AF_UNIX)
            probe.connect(path)
            code = 0
        except OSError as e:
            code = e.errno or 255
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    result = os.read(read, 1)
    os.close(read)
    return result[0]


class PermissionTests(DaemonFixture, TestCase):
    """
    Who may change the daemon: the peer's credentials decide (the lookup is
    given, the check is the real one).
    """

    def setUp(self) -> None:
        self.devcloud = self.start_devcloud(self)
        self.path = os.path.join(self.socket_dir(self), "ngrokd.sock")

    async def start_as(self, peer: Peer, admin_gid: int | None) -> Daemon:
        daemon = await self.start_daemon(self, self.devcloud, self.path)
        control = control_of(daemon)
        control._credentials = lambda transport: peer
        controller: Controller = control.controller
        controller.admin_gid = admin_gid
        return daemon

    def test_realCredentials(self) -> Deferred[None]:
        """
        The kernel's credentials for a real peer are this process's.
        """

        async def run() -> None:
            server, client = socket.socketpair(socket.AF_UNIX)
            self.addCleanup(server.close)
            self.addCleanup(client.close)

            class Handle:
                def getHandle(self) -> socket.socket:
                    return server

            peer = transport_peer(Handle())  # type: ignore[arg-type]
            self.assertEqual((peer.pid, peer.uid), (os.getpid(), os.geteuid()))
            self.assertIn(os.getegid(), peer.gids)

        return ensureDeferred(run())

    def test_strangerRefused(self) -> Deferred[None]:
        """
        A user who is not root, not the daemon's user and not in the admin
        group is refused C{set-api-key}, told why and what to do; reading
        still works.
        """

        async def run() -> None:
            await self.start_as(Peer(1, 4242, frozenset({4242})), admin_gid=5555)
            client = await amp_client(self, self.path)
            await client.callRemote(Status)
            error = await self.assertFailure(
                client.callRemote(SetAPIKey, key="k"), NotPermitted
            )
            self.assertIn("set-api-key changes the daemon", str(error))
            self.assertIn("sudo ngrokctl", str(error))
            answer = await legacy(
                self.path, b'{"command": "set-api-key", "args": ["k"]}'
            )
            self.assertFalse(answer["success"])
            self.assertIn("set-api-key changes the daemon", answer["error"])

        return ensureDeferred(run())

    def test_adminGroupMember(self) -> Deferred[None]:
        """
        A member of the admin group may set the key (a wrong one is then
        refused by ngrok, not by the socket).
        """

        async def run() -> None:
            await self.start_as(Peer(1, 4242, frozenset({4242, 5555})), admin_gid=5555)
            client = await amp_client(self, self.path)
            error = await self.assertFailure(
                client.callRemote(SetAPIKey, key="wrong-key"), Exception
            )
            self.assertNotIsInstance(error, NotPermitted)
            self.assertIn("not accepted", str(error))

        return ensureDeferred(run())


class PagingTests(TestCase):
    """
    A list of 10,000 endpoints arrives whole, in pages under AMP's limit.
    """

    def test_tenThousand(self) -> Deferred[None]:
        """
        Every row arrives once, in order, and no page is over the limit.
        """
        rows = tuple(
            EndpointStatus(
                id=f"ep_{i:05}",
                url=f"tcp://service-{i:05}.namespace-with-a-long-name:5432",
                listen_address=f"127.0.0.1:{10000 + i}",
                state="listening",
                reason="",
                client_address=f"127.0.0.1:{10000 + i}",
                mode="127.0.0.1",
            )
            for i in range(10_000)
        )

        async def run() -> None:
            directory = tempfile.mkdtemp(prefix="ngrokd-ctl-")
            self.addCleanup(shutil.rmtree, directory, True)
            path = os.path.join(directory, "s")
            defaults = default_config(os.path.join(directory, "c.yml"), {}, "linux")
            config = attrs.evolve(
                defaults.config,
                server=attrs.evolve(defaults.config.server, socket_path=path),
            )
            daemon = SimpleNamespace(config=config, endpoint_status=lambda: rows)
            feed = EventFeed(lambda: None, StatusBoard(dict), reactor)  # type: ignore[arg-type,return-value]
            service = ControlService(daemon, feed, reactor)
            service.startService()
            self.addCleanup(service.stopService)
            await service.whenListening()
            client = await amp_client(self, path)
            seen: list[str] = []
            cursor: int | None = 0
            pages = 0
            while cursor is not None and pages < 1000:
                page = await client.callRemote(ListEndpoints, cursor=cursor)
                size = len(json.dumps(page["endpoints"], separators=(",", ":")))
                self.assertLessEqual(size, PAGE_BYTES)
                seen += [row["id"] for row in page["endpoints"]]
                cursor = page.get("next")
                pages += 1
            self.assertEqual(seen, [row.id for row in rows])
            self.assertGreater(pages, 1)

        return ensureDeferred(run())
