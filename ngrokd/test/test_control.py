"""
Tests for L{ngrokd.control.server}, L{ngrokd.control.connection} and
L{ngrokd.control.responders}: the control socket over a real UNIX socket,
in front of a real daemon registered with the devcloud.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import json
import os
import re
import shutil
import socket
import stat
import struct
import sys
import tempfile
from types import SimpleNamespace
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from ngrokd.board import StatusBoard
from ngrokd.config import default_config, load_config
from ngrokd.control.address import AddressError, ControlAddress, control_address
from ngrokd.control.client import EXIT_PERMISSION, EXIT_TIMEOUT, ControlError, connect
from ngrokd.control.commands import (
    PAGE_BYTES,
    Events,
    Hello,
    ListEndpoints,
    NotPermitted,
    SetAPIKey,
    Status,
)
from ngrokd.control.connection import (
    MAX_BOX_BYTES,
    MAX_CONNECTIONS,
    MAX_PENDING_ANSWERS,
    ControlAMP,
)
from ngrokd.control.controller import Controller
from ngrokd.control.feed import EventFeed
from ngrokd.control.legacy import MAX_LEGACY_REQUEST
from ngrokd.control.peer import Peer
from ngrokd.control.responders import MAX_EVENT_WAIT, ControlCommands
from ngrokd.control.server import ControlService, transport_peer
from ngrokd.daemon import Daemon
from ngrokd.datapath.sendnow import unsent
from ngrokd.devcloud.tap import RunningDevcloud, start_devcloud
from ngrokd.ngrok.identity_service import WAITING_FOR_KEY
from ngrokd.status import EndpointStatus
from ngrokd.tap import build_daemon
from ngrokd.test.helpers import (
    Echo,
    Recorder,
    free_ports,
    listen,
    settle,
    unused_port,
    wait_listening,
    wait_until,
)


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
        # Its files are read in a thread: the first poll applied, or the
        # wait for a key known.
        await wait_until(
            lambda: (
                daemon.daemon_status().polled
                or daemon.identity_service.state == WAITING_FOR_KEY
            ),
            "the first poll applied, or the wait for an API key",
        )
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
        C{list} answers the original's fields for every endpoint, with the
        original's types and values (C{local_listener} a boolean, C{ip} the
        address in network mode too), and ours after them; the request
        needs no newline.
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
                    "listen_address",
                    "state",
                    "reason",
                },
            )
            self.assertEqual((row["hostname"], row["port"]), ("echo.test", 7000))
            self.assertEqual(row["listen_interface"], "127.0.0.1")
            self.assertIs(row["local_listener"], True)
            self.assertEqual(row["ip"], "127.0.0.1")
            self.assertEqual(row["listen_address"], f"127.0.0.1:{row['network_port']}")
            self.assertEqual((row["state"], row["reason"]), ("listening", ""))

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


def log_formats(case: TestCase) -> list[str]:
    """
    The formats of the events logged until the end of C{case}, with their
    fields filled in.
    """
    logged: list[str] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_format"):
            logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return logged


def amp_pair(key: bytes, value: bytes) -> bytes:
    return struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value


#: Other users for the peers of the socket: a member of the socket's group
#: (C{nogroup}), and the admin group some tests give the daemon.
MEMBER_UID = 4242
SOCKET_GROUP = "nogroup"
ADMIN_GID = 5555


def need_root() -> None:
    if os.geteuid() != 0:
        raise SkipTest("running peers as other users needs root")


class PeerProcess(ProcessProtocol):
    """
    L{ngrokd.test.controlpeer} or a program run as another user: its output,
    and when it ends.
    """

    def __init__(self, ready: bytes = b"") -> None:
        self.out = b""
        self.err = b""
        self._ready = ready
        self.started: Deferred[None] = Deferred()
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if self._ready and self._ready in self.out and not self.started.called:
            self.started.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        if self._ready and not self.started.called:
            self.started.errback(AssertionError(self.err.decode()))
        self.ended.callback(getattr(reason.value, "exitCode", None))


def spawn_peer(
    case: TestCase, argv: list[str], ready: bytes = b"", user: list[str] | None = None
) -> PeerProcess:
    """
    Run C{argv} (C{python} first), as the user C{setpriv} makes with
    C{user}, or as root; ended at the end of C{case}.
    """
    process = PeerProcess(ready)
    command = [sys.executable, *argv]
    if user is not None:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise SkipTest("running a program as another user needs setpriv")
        # The user may read any file (Python and ngrokd where they are
        # installed: tox's directory is root's alone), nothing more: its
        # permissions on sockets are its own.
        reads = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
        command = [setpriv, *user, *reads, *command]
    transport = reactor.spawnProcess(process, command[0], command, env=None)

    async def end() -> None:
        transport.closeStdin()
        if process.ended.called:
            return
        process.ended.addTimeout(10, reactor)
        await process.ended

    case.addCleanup(lambda: ensureDeferred(end()))
    return process


async def peer(case: TestCase, *argv: str, ready: bytes = b"") -> PeerProcess:
    """
    L{ngrokd.test.controlpeer} with C{argv}: once it says C{ready}, or once
    it ends.
    """
    process = spawn_peer(case, ["-m", "ngrokd.test.controlpeer", *argv], ready)
    if ready:
        await process.started
    else:
        await process.ended
    return process


class HostileClientTests(DaemonFixture, TestCase):
    """
    What a member of the socket's group can no longer do to the daemon.
    """

    def setUp(self) -> None:
        self.devcloud = self.start_devcloud(self)
        self.path = os.path.join(self.socket_dir(self), "ngrokd.sock")

    def test_boxWithoutEndClosed(self) -> Deferred[None]:
        """
        A connection that sends AMP keys and values without ever ending the
        box is closed once the box is over the limit, with the reason
        logged, instead of being kept in memory without end; the daemon
        keeps answering.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.path)
            logged = log_formats(self)
            flood = Recorder()
            await UNIXClientEndpoint(reactor, self.path).connect(
                Factory.forProtocol(lambda: flood)
            )
            value = b"x" * 60_000
            flood.transport.write(
                b"".join(amp_pair(b"k%d" % i, value) for i in range(32))
            )
            flood.lost.addTimeout(10, reactor)
            await flood.lost
            self.assertTrue(
                any(f"sent a request over {MAX_BOX_BYTES} bytes" in f for f in logged),
                logged,
            )
            answer = await legacy(self.path, b'{"command": "status"}')
            self.assertTrue(answer["success"])

        return ensureDeferred(run())

    def test_notAMPClosed(self) -> Deferred[None]:
        """
        An empty box, or an answer to a question the daemon never asked,
        closes the connection with the reason logged, not a traceback; the
        second of a kind so soon is counted, not logged again.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.path)
            logged = log_formats(self)
            for junk in [b"\x00\x00", amp_pair(b"_answer", b"77") + b"\x00\x00"]:
                client = await UNIXClientEndpoint(reactor, self.path).connect(
                    Factory.forProtocol(Recorder)
                )
                client.transport.write(junk)
                client.lost.addTimeout(10, reactor)
                await client.lost
            closed = [f for f in logged if "is not an AMP request" in f]
            self.assertEqual(len(closed), 1, logged)

        return ensureDeferred(run())

    def test_unreadAnswersStopReading(self) -> Deferred[None]:
        """
        A client that pipelines requests and reads no answer is read no
        further once its unread answers fill a buffer (its requests stay
        with it), and gets every answer once it reads.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.path)
            client = await amp_client(self, self.path)
            transport: Any = client.transport
            transport.pauseProducing()
            calls = [client.callRemote(ListEndpoints, cursor=0) for _ in range(20_000)]
            held = await settle(lambda: unsent(transport))
            self.assertGreater(held, 0)
            transport.resumeProducing()
            pages = await gatherResults(calls)
            self.assertEqual(
                {len(page["endpoints"]) for page in pages}, {2}, "every answer"
            )

        return ensureDeferred(run())

    def test_legacyDeepNesting(self) -> Deferred[None]:
        """
        A request of 60,000 nested arrays is answered with the original's
        decode error, and nothing is logged as unhandled.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.path)
            answer = await legacy(self.path, b'{"command": ' + b"[" * 60_000)
            self.assertEqual(
                answer,
                {
                    "success": False,
                    "error": "failed to decode command: exceeded max depth",
                },
            )

        return ensureDeferred(run())

    def test_legacyMalformedFields(self) -> Deferred[None]:
        """
        C{args} that is not an array of strings, or a C{command} that is not
        a string, is answered with the original's decode error naming it.
        """

        async def run() -> None:
            await self.start_daemon(self, self.devcloud, self.path)
            for request, wrong in [
                (b'{"command": "set-api-key", "args": {"key": "k"}}', "args"),
                (b'{"command": "set-api-key", "args": [7]}', "args"),
                (b'{"command": ["status"]}', "command"),
            ]:
                answer = await legacy(self.path, request + b"\n")
                self.assertFalse(answer["success"], request)
                self.assertTrue(
                    answer["error"].startswith(f"failed to decode command: {wrong}"),
                    answer,
                )

        return ensureDeferred(run())

    def test_unixDescriptionKeepsMode(self) -> Deferred[None]:
        """
        C{server.socket_path} written as C{unix:PATH} makes the same socket
        a path does: mode 0660 and C{server.socket_group}.
        """

        async def run() -> None:
            await self.start_daemon(
                self,
                self.devcloud,
                f"unix:{self.path}",
                socket_group=SOCKET_GROUP,
            )
            found = os.stat(self.path)
            self.assertEqual(stat.S_IMODE(found.st_mode), 0o660)
            self.assertEqual(found.st_gid, grp.getgrnam(SOCKET_GROUP).gr_gid)
            answer = await legacy(self.path, b'{"command": "status"}')
            self.assertTrue(answer["success"])

        return ensureDeferred(run())

    def test_tcpDescriptionLoopbackReadOnly(self) -> Deferred[None]:
        """
        C{server.socket_path} written as C{tcp:PORT} listens on loopback
        only, says in the log that it serves reads only, answers reads, and
        refuses a reload saying why.
        """

        async def run() -> None:
            logged = log_formats(self)
            port = unused_port()
            await self.start_daemon(self, self.devcloud, f"tcp:{port}")
            self.assertEqual(_tcp_listening(port), ["127.0.0.1"])
            self.assertTrue(any("answers reads only" in f for f in logged), logged)
            control = await connect(reactor, f"tcp:127.0.0.1:{port}")
            self.addCleanup(control.close)
            self.assertTrue((await control.status())["registered"])
            with self.assertRaises(ControlError) as raised:
                await control.reload()
            refused = raised.exception
            self.assertEqual(refused.code, EXIT_PERMISSION)
            self.assertIn("cannot tell who is calling", str(refused))
            self.assertIn("UNIX socket", str(refused))

        return ensureDeferred(run())

    def test_heldConnectionsLeaveRoomForRoot(self) -> Deferred[None]:
        """
        With L{MAX_CONNECTIONS} held by a member of the socket's group, root
        is still served, and another member is told "too many connections"
        (by C{ngrokctl}, exit code 5, and over the original's protocol).
        """
        need_root()

        async def run() -> None:
            await self.start_daemon(
                self, self.devcloud, self.path, socket_group=SOCKET_GROUP
            )
            os.chmod(os.path.dirname(self.path), 0o755)
            logged = log_formats(self)
            member = [f"--uid={MEMBER_UID}", f"--gid={MEMBER_UID}"]
            await peer(
                self,
                *member,
                f"--groups={grp.getgrnam(SOCKET_GROUP).gr_gid}",
                self.path,
                "hold",
                str(MAX_CONNECTIONS),
                ready=b"held",
            )
            control = await connect(reactor, self.path)
            self.addCleanup(control.close)
            self.assertTrue((await control.status())["registered"])
            as_member = [
                f"--reuid={MEMBER_UID}",
                f"--regid={MEMBER_UID}",
                f"--groups={grp.getgrnam(SOCKET_GROUP).gr_gid}",
            ]
            status = ["-m", "ngrokd.ctl", "--socket", self.path, "status"]
            ngrokctl = spawn_peer(self, status, user=as_member)
            code = await ngrokctl.ended
            self.assertEqual(code, EXIT_TIMEOUT, ngrokctl.err)
            self.assertIn(b"too many connections", ngrokctl.err)
            script = spawn_peer(self, ["-c", _LEGACY_STATUS, self.path], user=as_member)
            await script.ended
            answer = json.loads(script.out)
            self.assertEqual(answer["success"], False, script.err)
            self.assertTrue(answer["error"].startswith("too many connections"))
            self.assertTrue(any("turned away: too many" in f for f in logged))

        return ensureDeferred(run())


#: A script of the original's: asks for the status, prints the answer.
_LEGACY_STATUS = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
s.sendall(b'{"command": "status"}\\n')
data = b""
while True:
    more = s.recv(65536)
    if not more:
        break
    data += more
sys.stdout.write(data.decode())
"""


def _tcp_listening(port: int) -> list[str]:
    """
    The IPv4 addresses a socket listens on at C{port}, from the kernel's
    table.
    """
    found = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(str(ipaddress.IPv4Address(bytes.fromhex(address)[::-1])))
    return found


class PeerGroupTests(DaemonFixture, TestCase):
    """
    The admin group is checked against the groups the peer had when it
    connected, as the kernel keeps them, for a real process of another user.
    """

    def setUp(self) -> None:
        need_root()
        self.devcloud = self.start_devcloud(self)
        self.path = os.path.join(self.socket_dir(self), "ngrokd.sock")

    async def started(self) -> None:
        daemon = await self.start_daemon(
            self, self.devcloud, self.path, socket_group=SOCKET_GROUP
        )
        os.chmod(os.path.dirname(self.path), 0o755)
        control_of(daemon).controller.admin_gid = ADMIN_GID

    def identity(self, groups: str = "") -> list[str]:
        gid = grp.getgrnam(SOCKET_GROUP).gr_gid
        return [f"--uid={MEMBER_UID}", f"--gid={gid}", f"--groups={groups}"]

    def test_adminGroupMember(self) -> Deferred[None]:
        """
        A process in the admin group may reload.
        """

        async def run() -> None:
            await self.started()
            ran = await peer(self, *self.identity(str(ADMIN_GID)), self.path, "reload")
            self.assertEqual(ran.out.strip(), b"answered", ran.err)

        return ensureDeferred(run())

    def test_groupJoinedAfterConnecting(self) -> Deferred[None]:
        """
        A process that joins the admin group after it connected (as a
        process that took a gone peer's pid would be) is refused.
        """

        async def run() -> None:
            await self.started()
            ran = await peer(
                self, *self.identity(), self.path, "reload", f"--join={ADMIN_GID}"
            )
            self.assertEqual(ran.out.strip(), b"NOT_PERMITTED", ran.err)

        return ensureDeferred(run())


class PendingAnswersTests(TestCase):
    """
    Requests whose answers wait (events) are parsed at most
    L{MAX_PENDING_ANSWERS} at a time.
    """

    def test_readingHeld(self) -> None:
        """
        Beyond L{MAX_PENDING_ANSWERS} waiting answers, the connection is
        read and parsed no further; once one is answered, the next request
        is taken.
        """
        waits: list[Deferred[list[Any]]] = []

        def wait(after: int, seconds: float) -> Deferred[list[Any]]:
            waits.append(Deferred())
            return waits[-1]

        controller = SimpleNamespace(feed=SimpleNamespace(wait=wait, last_id=0))
        protocol = ControlAMP(controller, None, lambda kind, reason: None)  # type: ignore[arg-type]
        transport = StringTransport()
        protocol.makeConnection(transport)
        request = Events.makeArguments({"after": 0, "wait": 30.0}, protocol)
        boxes = b""
        for tag in range(MAX_PENDING_ANSWERS + 1):
            request[b"_command"], request[b"_ask"] = b"Events", b"%d" % tag
            boxes += amp.AmpBox(request).serialize()
        protocol.dataReceived(boxes)
        self.assertEqual(
            (len(waits), transport.producerState),
            (MAX_PENDING_ANSWERS, "paused"),
        )
        waits[0].callback([])
        self.assertEqual(
            (len(waits), transport.producerState),
            (MAX_PENDING_ANSWERS + 1, "paused"),
        )


class ControlAddressTests(SynchronousTestCase):
    """
    Where C{server.socket_path} says to listen.
    """

    def test_path(self) -> None:
        """
        A path is a UNIX socket of mode 0660.
        """
        self.assertEqual(
            control_address("/run/ngrokd.sock"),
            ControlAddress("/run/ngrokd.sock", path="/run/ngrokd.sock"),
        )

    def test_unix(self) -> None:
        """
        A C{unix:} description is the same socket, its own mode and backlog
        kept, by position or by name.
        """
        self.assertEqual(
            control_address("unix:/run/a\\:b.sock"),
            ControlAddress("unix:/run/a\\:b.sock", path="/run/a:b.sock"),
        )
        for description in ("unix:/s:600:7", "unix:address=/s:mode=600:backlog=7"):
            self.assertEqual(
                control_address(description),
                ControlAddress(
                    description, path="/s", mode=0o600, mode_named=True, backlog=7
                ),
            )

    def test_unixRefused(self) -> None:
        """
        A C{unix:} description without a path, with a mode that is not
        octal or with too many fields is refused, saying so.
        """
        for description, says in [
            ("unix:", "names no path"),
            ("unix:/s:mode=rw", "mode must be octal"),
            ("unix:/s:660:5:1:extra", "more fields"),
        ]:
            with self.assertRaises(AddressError) as raised:
                control_address(description)
            self.assertIn(says, str(raised.exception))

    def test_tcpLoopback(self) -> None:
        """
        C{tcp:} and C{tcp6:} without an interface listen on loopback; one
        that names it keeps it. Either is marked TCP.
        """
        for description, listened in [
            ("tcp:9999", "tcp:9999:interface=127.0.0.1"),
            ("tcp6:port=9999", "tcp6:port=9999:interface=\\:\\:1"),
            ("tcp:9999:0.0.0.0", "tcp:9999:0.0.0.0"),
            ("tcp:9999:interface=192.0.2.1", "tcp:9999:interface=192.0.2.1"),
        ]:
            self.assertEqual(
                control_address(description), ControlAddress(listened, tcp=True)
            )

    def test_otherKinds(self) -> None:
        """
        Any other description goes to Twisted as it is.
        """
        self.assertEqual(
            control_address("systemd:domain=UNIX:index=0"),
            ControlAddress("systemd:domain=UNIX:index=0"),
        )


class ResponderTests(SynchronousTestCase):
    """
    The answers to C{ngrokctl}'s commands, apart from a connection.
    """

    def test_eventsWaitBounded(self) -> None:
        """
        An events call waits at most L{MAX_EVENT_WAIT} seconds, whatever it
        asks, and never less than none.
        """
        asked: list[float] = []

        def wait(after: int, seconds: float) -> Deferred[list[Any]]:
            asked.append(seconds)
            return succeed([])

        controller = SimpleNamespace(feed=SimpleNamespace(wait=wait, last_id=7))
        commands = ControlCommands(controller, None)  # type: ignore[arg-type]
        for seconds in (3600.0, -5.0, None, 2.5):
            answer = self.successResultOf(
                ensureDeferred(commands.events(after=0, wait=seconds))
            )
            self.assertEqual(answer, {"events": [], "last": 7})
        self.assertEqual(asked, [MAX_EVENT_WAIT, 0.0, 0.0, 2.5])
