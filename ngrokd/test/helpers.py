"""
Peers for tests over real sockets on loopback (a recording client, backends,
a bounded wait) and an in-memory transport for the splice beneath them.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from textwrap import dedent
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest
from zope.interface import implementer

import ngrokd
from ngrokd.datapath.ingress import IngressConnector
from ngrokd.datapath.sendnow import unsent
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.cloud import Cloud
from ngrokd.devcloud.ingress import IngressFactory, server_options, tls_factory
from ngrokd.ngrok.identity import generate_key, make_csr
from ngrokd.ngrok.trust import PartialChainTrust
from ngrokd.pem import parse_certificates
from ngrokd.status import DaemonStatus


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """
    Records what arrives and how the connection ends. C{on_read_closed} runs
    when the peer stops sending (by default the connection is closed then),
    C{on_connected} when connected.
    """

    transport: Any

    def __init__(
        self,
        on_read_closed: Callable[[Any], object] | None = None,
        on_connected: Callable[[Any], object] | None = None,
    ) -> None:
        self.received = b""
        self.read_closed = False
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()
        self._on_read_closed = on_read_closed
        self._on_connected = on_connected

    def connectionMade(self) -> None:
        if self._on_connected:
            self._on_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.read_closed = True
        if self._on_read_closed:
            self._on_read_closed(self)
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


class Counter(Recorder):
    """
    Counts the bytes that arrive instead of keeping them.
    """

    count = 0

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """
    Echoes; at the end of the input it finishes the output too.
    """

    transport: Any

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IPushProducer)
class Source(Protocol):
    """
    Sends C{total} bytes as fast as the connection takes them, then closes;
    C{sent} shows how far flow control let it get.
    """

    chunk = b"x" * 65536
    transport: Any

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self._paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while not self._paused and self.sent < self.total:
            data = self.piece()
            self.sent += len(data)
            self.transport.write(data)
        if self.sent >= self.total:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        self._paused = True

    def piece(self) -> bytes:
        """
        The next bytes to send.
        """
        return self.chunk[: self.total - self.sent]


class TCPLikeTransport(StringTransport):
    """
    A L{StringTransport} that acts as Twisted's TCP transport does where a
    splice relies on it: a write past C{bufferSize} pauses the registered
    producer and L{drain} (the peer reading everything) resumes it;
    C{loseWriteConnection} (a FIN) is recorded and a write after it fails the
    test; a producer may be unregistered twice; keepalive is recorded (there
    is no socket to tune).
    """

    bufferSize = 64 * 1024
    write_closed = False
    no_delay = False
    keep_alive = False

    def __init__(self) -> None:
        # Lenient: TCP lets a producer be paused or resumed after
        # loseConnection, and so does the splice.
        super().__init__(lenient=True)

    def write(self, data: bytes) -> None:
        if self.write_closed:
            raise AssertionError(f"{data!r} written after loseWriteConnection")
        super().write(data)
        if self.producer is not None and len(self.value()) > self.bufferSize:
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """
        Everything written since the last drain; the buffer is empty again,
        so the producer may go on.
        """
        data = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keep_alive = enabled

    def getHandle(self) -> None:
        return None


def listen(factory: Any, test: Any) -> int:
    """
    Serve C{factory} on 127.0.0.1 for the duration of C{test}; its port.
    """
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return int(port.getHost().port)  # type: ignore[attr-defined]


def connect(
    port: int, protocol: Protocol, host: str = "127.0.0.1"
) -> Deferred[Protocol]:
    """
    Connect C{protocol} to C{host}:C{port}.
    """
    return connectProtocol(TCP4ClientEndpoint(reactor, host, port), protocol)


@attrs.define
class DevcloudIngress:
    """
    The devcloud's ingress on 127.0.0.1 over real mutual TLS, and a
    connector to it with a registered operator's certificate.
    """

    cloud: Cloud
    ingress: IngressFactory
    connector: IngressConnector
    #: The ingress's TLS server factory and its listening port.
    server: Any
    port: Any

    async def restart(self) -> None:
        """
        Restart the ingress as a deploy does: stop listening, close every
        connection, and listen again on the same port.
        """
        number = self.port.getHost().port
        await self.port.stopListening()
        await self.ingress.close_all()
        self.port = reactor.listenTCP(number, self.server, interface="127.0.0.1")

    def new_certificate(self) -> tuple[bytes, bytes]:
        """
        The certificate and key of a newly registered operator.
        """
        key_pem = generate_key()
        operator = self.cloud.register(
            "test", "{}", ["bindings"], "global", {}, [], make_csr(key_pem)
        )
        return operator.cert.cert_pem, key_pem


def devcloud_ingress(case: Any, **connector: Any) -> DevcloudIngress:
    """
    Serve the devcloud's ingress for the duration of C{case}, and a
    connector to it given C{connector}'s settings; the ingress's own
    settings are its factory's attributes (C{request_timeout}).
    """
    ca = CertificateAuthority.create("test root")
    cert, key = ca.issue_server(["127.0.0.1"])
    cloud = Cloud(ca, [], "127.0.0.1:443")
    ingress = IngressFactory(cloud, reactor)
    case.addCleanup(ingress.close_all)
    server: Any = tls_factory(ingress, server_options(cert, key, ca.cert_pem))
    port = reactor.listenTCP(0, server, interface="127.0.0.1")
    number = int(port.getHost().port)  # type: ignore[attr-defined]
    trust = PartialChainTrust(parse_certificates(ca.cert_pem, "ca"), system=False)
    connecting = IngressConnector(reactor, "127.0.0.1", number, trust, **connector)
    harness = DevcloudIngress(cloud, ingress, connecting, server, port)
    case.addCleanup(lambda: harness.port.stopListening())
    harness.connector.use_certificate(*harness.new_certificate())
    case.addCleanup(harness.connector.stop)
    return harness


async def exchange(port: int, data: bytes, host: str = "127.0.0.1") -> Recorder:
    """
    Connect to C{host}:C{port}, send C{data}, stop sending, and read until
    the connection closes; the client, with what it received.
    """
    client = Recorder()
    await connect(port, client, host)
    client.transport.write(data)
    client.transport.loseWriteConnection()
    await client.lost
    return client


async def wait_until(
    condition: Callable[[], bool], what: str, timeout: float = 10.0
) -> None:
    """
    Wait for C{condition} on the real reactor, at most C{timeout} seconds.
    """
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


async def settle(value: Callable[[], int], timeout: float = 10.0) -> int:
    """
    Wait until C{value()} stops changing for a moment; its final value.
    """
    last = -1
    for _ in range(int(timeout / 0.2)):
        current = value()
        if current == last:
            return current
        last = current
        await deferLater(reactor, 0.2, lambda: None)
    raise AssertionError("the value kept changing")


#: What the daemon may hold for one slow reader, in the tests that check it.
BUFFER_BOUND = 512 * 1024


async def assert_flow_controlled(
    test: Any, source: Source, bridge: Any, reader: Counter
) -> None:
    """
    With C{reader} not reading, C{source} is made to wait before its end
    while the one connection of C{bridge} (a L{BridgeFactory}) holds under
    L{BUFFER_BOUND}; once C{reader} reads again, every byte arrives.
    """
    # The client is not read until the ingress leg exists: a stall before
    # then is the dial's, not flow control's.
    await wait_until(
        lambda: [c.ingress is not None for c in bridge.connections] == [True],
        "the ingress leg",
    )
    stalled_at = await settle(lambda: source.sent)
    test.assertLess(stalled_at, source.total)
    (local,) = bridge.connections
    held = unsent(local.transport) + unsent(local.ingress.transport.transport)
    test.assertLess(held, BUFFER_BOUND)
    reader.transport.resumeProducing()
    await reader.lost
    test.assertEqual(reader.count, source.total)


def unused_port() -> int:
    """
    A port nothing listens on now (for a backend that is down).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> int:
    """
    The first of C{count} consecutive ports that are free now, below the
    ephemeral range, so that no outgoing connection (of this test or one
    running beside it) takes one of them before the daemon binds it.
    """
    high = _ephemeral_low() - count
    for _ in range(100):
        first = random.randrange(10000, high)
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise AssertionError(f"no {count} consecutive free ports")


def ready_status(**changes: Any) -> DaemonStatus:
    """
    The status of a registered daemon that applied a poll and whose two
    listeners are up, with C{changes}.
    """
    ready = DaemonStatus(
        version="1",
        started=100.0,
        now=160.0,
        identity_state="registered",
        operator_id="k8sop_1",
        certificate_expires=None,
        identity_error="",
        ingress_endpoint="ingress.test:443",
        polled=True,
        last_poll=150.0,
        poll_error="",
        poll_failures=0,
        endpoints=2,
        listeners_planned=2,
        listeners_up=2,
    )
    return attrs.evolve(ready, **changes)


async def wait_listening(daemon: Any, expected: int) -> None:
    """
    Wait until C{expected} of C{daemon}'s listeners listen.
    """
    await wait_until(
        lambda: (
            sum(x.listening for x in daemon.listeners.listeners.values()) == expected
        ),
        f"{expected} listeners",
    )


def source_file(*parts: str) -> str:
    """
    The path of a file of the source tree (C{contrib/config.yml}); the test
    is skipped where there is none.
    """
    here = os.path.dirname(os.path.dirname(os.path.abspath(ngrokd.__file__)))
    # Installed from a wheel, tox names the source tree; trial runs in its
    # _trial_temp (_trial_temp/N with several workers).
    cwd = os.getcwd()
    tops = [
        os.environ.get("NGROKD_SOURCE_TREE", ""),
        here,
        os.path.dirname(cwd),
        os.path.dirname(os.path.dirname(cwd)),
    ]
    for top in filter(None, tops):
        candidate = os.path.join(top, *parts)
        if os.path.exists(candidate):
            return candidate
    raise SkipTest(f"{'/'.join(parts)} is not in reach (no source tree)")


def offline_config(base: str, socket_path: str) -> str:
    """
    Write C{base}/config.yml for a daemon that needs nothing of ngrok: no
    API key (it waits for one), its state, hosts file and control socket
    its own; the file's path.
    """
    path = os.path.join(base, "config.yml")
    with open(path, "w") as f:
        f.write(
            dedent(
                f"""\
                api:
                  url: https://127.0.0.1:1
                server:
                  state_dir: {base}/state
                  socket_path: {socket_path}
                  health_address: ""
                net:
                  listen_interface: "127.0.0.1"
                  hosts_file: {base}/hosts
                """
            )
        )
    return path


def offline_twistd(
    test: Any, log_name: str = "ngrokd.log", environ: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str, str]:
    """
    Run C{twistd -n ngrokd} on an L{offline_config} of its own (its control
    socket in a short temporary directory), with no API key in its
    environment but C{environ}'s variables: the process, the path of its
    log (C{log_name} in its directory) and of its control socket.
    """
    base = os.path.abspath(test.mktemp())
    os.makedirs(base)
    socket_dir = tempfile.mkdtemp(prefix="ngrokd-")
    test.addCleanup(shutil.rmtree, socket_dir, True)
    socket_path = os.path.join(socket_dir, "ngrokd.sock")
    config = offline_config(base, socket_path)
    log = os.path.join(base, log_name)
    env = {k: v for k, v in os.environ.items() if k != "NGROK_API_KEY"}
    env.update(environ or {})
    return spawn_twistd(test, config, log, env=env, cwd=base), log, socket_path


def spawn_twistd(
    test: Any,
    config_path: str,
    log_path: str,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    open_files: int | None = None,
) -> subprocess.Popen[bytes]:
    """
    Run C{twistd -n ngrokd --config CONFIG_PATH} as its own process, its
    output to C{log_path}, killed at the end of C{test} if still running;
    with C{open_files}, that is its limit on open files (soft and hard).
    """
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    argv = [twistd, "-n", "--pidfile=", "ngrokd", "--config", config_path]
    return spawn(test, argv, log_path, env, cwd, open_files)


def spawn(
    test: Any,
    argv: list[str],
    log_path: str,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    open_files: int | None = None,
) -> subprocess.Popen[bytes]:
    """
    Run C{argv} as its own process, its output to C{log_path}, killed at
    the end of C{test} if still running; with C{open_files}, that is its
    limit on open files (soft and hard).
    """

    def limit() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    log = open(log_path, "wb")  # noqa: SIM115 (closed at cleanup)
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        preexec_fn=limit,
    )

    def stop() -> None:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        log.close()

    test.addCleanup(stop)
    return process
