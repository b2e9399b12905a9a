"""
The data-path benchmark: what carrying a connection through ngrokd costs.

    python bench/datapath.py [--json FILE] [--concurrency 5000] [--quick]

One run starts everything it needs on 127.0.0.1, in processes of its own: the
backends (C{bench/_backends.py}: an echo server and a source server), a
stunnel mutual-TLS pair in front of them when stunnel is installed (the C
baseline, C{bench/_stunnel.py}), the devcloud (C{twistd -n ngrokd-devcloud})
with one endpoint per backend, and the daemon (C{twistd -n ngrokd}) with the
config the devcloud wrote, in network mode. It then measures the same client
code straight to the backends, through the stunnel pair and through the
daemon: the time from a new connection to its first echoed byte, bulk
throughput over one and over eight connections, and five thousand
connections opened at once. It reads each process's CPU time and RSS from
/proc, and the daemon's RSS and connections to the ingress once it has been
left alone after the last phase; it prints a table, the targets the daemon is
judged by against the stunnel pair and, with C{--json}, writes every number.
Every process it starts is stopped when it ends, also on Ctrl-C, and dies
with it if it is killed. Linux only (/proc, prctl).

This is not a test: it asserts nothing about speed. It fails (exit status 1)
only when the data is wrong or a connection fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import OpenSSL
import yaml
from _backends import COUNT
from _proc import (
    PeakRss,
    cpu_seconds,
    established_to_port,
    listening_ports,
    status_kib,
)
from _relay import WINDOW
from _stunnel import (
    Handshakes,
    Service,
    count_handshakes,
    describe_version,
    find_stunnel,
    write_pair,
)
from attrs import frozen
from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import twisted
from ngrokd.config import ConfigError, load_config
from ngrokd.host.allocation import NETWORK_PORTS, CorruptStateFile, decode_network_ports

T = TypeVar("T")
Address = tuple[str, int]

LOOPBACK = "127.0.0.1"
MiB = 1024 * 1024

#: The backends, and the endpoint (hostname, port) the devcloud binds to each.
ECHO, SOURCE = "echo", "source"
ENDPOINTS = {ECHO: ("echo.bench", 7), SOURCE: ("bulk.bench", 9)}

#: Where ngrokd's network-mode listeners start, unless that port is taken.
DEFAULT_START_PORT = 9080
PARALLEL_CONNECTIONS = 8
WARMUP_CONNECTIONS = 5

# Bounds on every wait, in seconds.
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
BACKENDS_TIMEOUT = 15.0
RELAY_TIMEOUT = 15.0
DEVCLOUD_TIMEOUT = 30.0
DAEMON_TIMEOUT = 90.0
STUNNEL_TIMEOUT = 15.0
PROBE_TIMEOUT = 5.0
ROUND_TRIP_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
#: Before ngrokd's idle figures are read: its readiness probes' legs close.
IDLE_PAUSE = 1.0
#: The longest --delay, in ms: a round trip stays well within every bound.
MAX_DELAY_MS = 1000.0
#: A bulk phase may take this long plus its bytes at this rate (bytes/s).
BULK_SLACK, BULK_MIN_RATE = 60.0, 2_000_000

RECV_SIZE = 1024 * 1024
#: The most of ngrokd's /metrics read.
METRICS_LIMIT = 4 * MiB
#: ngrokd's ingress.pool_linger is this part of --settle (at least
#: MIN_LINGER), so that the settled reading comes after the linger; its
#: pool_idle_timeout is at most that.
LINGER_OF_SETTLE, MIN_LINGER = 0.5, 0.1
POOL_IDLE_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """
    The benchmark could not run to the end; the message says what failed.
    """


class ChildExited(BenchError):
    """
    A process the benchmark started exited before the benchmark was done.
    """


class NotReady(BenchError):
    """
    A process did not become usable in time.
    """


class WrongData(BenchError):
    """
    A connection returned other bytes, or another number of bytes, than sent.
    """


class ConnectionFailed(BenchError):
    """
    A measured connection failed (refused, reset, timed out).
    """


class PhaseTimeout(BenchError):
    """
    A measurement took longer than its bound.
    """


# Processes


@frozen
class Child:
    """
    A process the benchmark started; its output goes to C{log}.
    """

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            return f"(cannot read {self.log}: {e.strerror})"
        last = text.splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in last) or "    (no output)"

    def check(self) -> None:
        """
        @raise ChildExited: the process has exited.
        """
        code = self.process.poll()
        if code is not None:
            raise ChildExited(
                f"{self.name} (pid {self.pid}) exited with status {code};"
                f" the end of {self.log}:\n{self.tail()}"
            )


def _die_with_parent() -> None:
    """
    In the child, before exec: get SIGTERM when the benchmark dies, even by
    SIGKILL, so nothing it started outlives it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Children:
    """
    The processes the benchmark started, stopped in reverse order.
    """

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._children: list[Child] = []

    def spawn(self, name: str, argv: Sequence[str]) -> Child:
        log = self._workdir / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # The run must use the devcloud's key and hosts file, nothing of the user's.
        for key in ("NGROK_API_KEY", "NGROKD_HOSTS_PATH"):
            env.pop(key, None)
        with open(log, "wb") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only us; we stop them
                preexec_fn=_die_with_parent,
            )
        child = Child(name, process, log)
        self._children.append(child)
        return child

    def stop_all(self) -> None:
        """
        SIGTERM each, newest first; SIGKILL what is still running after
        C{STOP_TIMEOUT}.
        """
        while self._children:
            child = self._children.pop()
            if child.process.poll() is not None:
                continue
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(
                    f"datapath: {child.name} (pid {child.pid}) ignored SIGTERM"
                    f" for {STOP_TIMEOUT:.0f}s, killing it",
                    file=sys.stderr,
                )
                child.process.kill()
                child.process.wait(STOP_TIMEOUT)


def wait_until(
    ready: Callable[[], T | None],
    timeout: float,
    what: str,
    watch: Sequence[Child],
) -> T:
    """
    Poll C{ready} until it returns something other than C{None}.

    @raise ChildExited: a watched process exited meanwhile.
    @raise NotReady: C{timeout} seconds passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        for child in watch:
            child.check()
        result = ready()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            logs = "".join(
                f"\nthe end of {child.log}:\n{child.tail()}" for child in watch
            )
            raise NotReady(f"{what}: not ready after {timeout:.0f}s{logs}")
        time.sleep(0.1)


def raise_fd_limit() -> int:
    """
    Raise the soft limit on open files to the hard one (the children inherit
    it): a thousand connections through a proxy take three thousand or more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# The client: the same code for every path


def _fast_socket(address: Address) -> socket.socket:
    sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def first_byte_seconds(address: Address) -> float:
    """
    Connect, send one byte, read its echo: the seconds that took.
    """
    start = time.perf_counter()
    with _fast_socket(address) as sock:
        sock.settimeout(IDLE_TIMEOUT)
        sock.sendall(b"x")
        echoed = sock.recv(1)
        elapsed = time.perf_counter() - start
    if echoed != b"x":
        raise WrongData(f"{address[0]}:{address[1]} echoed {echoed!r}, not b'x'")
    return elapsed


def identify(address: Address) -> str | None:
    """
    Which backend answers at C{address} (L{ECHO} or L{SOURCE}), after one
    round trip; C{None} when none does (yet).
    """
    request = COUNT.pack(3)
    received = b""
    try:
        with _fast_socket(address) as sock:
            sock.settimeout(PROBE_TIMEOUT)
            sock.sendall(request)
            while len(received) < len(request):
                chunk = sock.recv(64)
                if not chunk:
                    break
                received += chunk
    except OSError:
        return None
    if received == request:
        return ECHO
    if received == bytes(3):
        return SOURCE
    return None


def pull(address: Address, size: int, deadline: float) -> None:
    """
    Ask the source at C{address} for C{size} bytes and read them all.

    @raise WrongData: the source sent another number of bytes.
    @raise PhaseTimeout: C{deadline} (monotonic) passed.
    """
    received = 0
    buffer = bytearray(RECV_SIZE)
    with _fast_socket(address) as sock:
        sock.settimeout(IDLE_TIMEOUT)
        sock.sendall(COUNT.pack(size))
        while n := sock.recv_into(buffer):
            received += n
            if received > size:
                break
            if time.monotonic() > deadline:
                raise PhaseTimeout(
                    f"pulling {size} bytes from {address[0]}:{address[1]}:"
                    f" {received} after the deadline"
                )
    if received != size:
        raise WrongData(
            f"{address[0]}:{address[1]} sent {received} bytes, {size} were asked for"
        )


@frozen
class Latency:
    """
    Connect-to-first-echoed-byte times of sequential new connections, in ms.
    """

    connections: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    mean_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ms = [s * 1000 for s in seconds]
        cuts = statistics.quantiles(ms, n=100, method="inclusive")
        return cls(
            len(ms),
            cuts[49],
            cuts[89],
            cuts[98],
            min(ms),
            statistics.fmean(ms),
            max(ms),
        )


def measure_latency(address: Address, connections: int) -> Latency:
    """
    L{first_byte_seconds} C{connections} times, one after the other, after
    C{WARMUP_CONNECTIONS} that do not count.
    """
    seconds = []
    for index in range(WARMUP_CONNECTIONS + connections):
        try:
            seconds.append(first_byte_seconds(address))
        except OSError as e:
            raise ConnectionFailed(
                f"new connection {index + 1} to {address[0]}:{address[1]}: {e}"
            ) from None
    return Latency.of(seconds[WARMUP_CONNECTIONS:])


@frozen
class Throughput:
    """
    C{connections} connections in parallel, each pulling C{bytes_each}.
    """

    connections: int
    bytes_each: int
    seconds: float
    mb_per_s: float  # 10**6 bytes per second, all connections together

    @property
    def total_bytes(self) -> int:
        return self.connections * self.bytes_each


def measure_bulk(address: Address, connections: int, bytes_each: int) -> Throughput:
    """
    Pull C{bytes_each} over each of C{connections} parallel connections.
    """
    total = connections * bytes_each
    deadline = time.monotonic() + BULK_SLACK + total / BULK_MIN_RATE
    errors: list[Exception] = []

    def run() -> None:
        try:
            pull(address, bytes_each, deadline)
        except (OSError, BenchError) as e:
            errors.append(e)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(connections)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + IDLE_TIMEOUT)
        if thread.is_alive():
            raise PhaseTimeout(f"bulk transfer from {address[0]}:{address[1]} hung")
    seconds = time.perf_counter() - start
    if errors:
        raise ConnectionFailed(
            f"{len(errors)} of {connections} bulk connections to"
            f" {address[0]}:{address[1]} failed: {errors[0]}"
        )
    return Throughput(connections, bytes_each, seconds, total / seconds / 1e6)


@frozen
class Concurrency:
    """
    C{connections} connections opened at once, each doing one echo round
    trip, all held open until every one is done.
    """

    connections: int
    succeeded: int
    failed: int
    wall_seconds: float  # from the first connect to the last echo
    p50_seconds: float  # per connection, from the common start to its echo
    errors: dict[str, int]
    close_errors: dict[str, int]


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.IncompleteReadError):
        return f"closed after {len(error.partial)} of {error.expected} bytes"
    if isinstance(error, TimeoutError):
        return f"no echo within {ROUND_TRIP_TIMEOUT:.0f}s"
    return f"{type(error).__name__}: {error}"


async def _concurrent(address: Address, connections: int) -> Concurrency:
    loop = asyncio.get_running_loop()
    everyone_done = asyncio.Event()
    pending = connections
    done_at: list[float] = []
    errors: Counter[str] = Counter()
    close_errors: Counter[str] = Counter()
    start = loop.time()

    async def one(index: int) -> None:
        nonlocal pending
        writer: asyncio.StreamWriter | None = None
        message = b"echo %010d\n" % index
        try:
            async with asyncio.timeout(ROUND_TRIP_TIMEOUT):
                reader, writer = await asyncio.open_connection(*address)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                writer.write(message)
                echoed = await reader.readexactly(len(message))
            if echoed != message:
                raise WrongData(f"echoed {echoed!r} for {message!r}")
            done_at.append(loop.time() - start)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, WrongData) as e:
            errors[_describe(e)] += 1
        finally:
            pending -= 1
            if pending == 0:
                everyone_done.set()
        await everyone_done.wait()
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError as e:
                close_errors[_describe(e)] += 1

    async with asyncio.timeout(ROUND_TRIP_TIMEOUT + CONNECT_TIMEOUT + IDLE_TIMEOUT):
        await asyncio.gather(*(one(i) for i in range(connections)))
    done_at.sort()
    return Concurrency(
        connections,
        len(done_at),
        connections - len(done_at),
        done_at[-1] if done_at else 0.0,
        statistics.median(done_at) if done_at else 0.0,
        dict(errors),
        dict(close_errors),
    )


def measure_concurrency(address: Address, connections: int) -> Concurrency:
    try:
        return asyncio.run(_concurrent(address, connections))
    except TimeoutError:
        raise PhaseTimeout(
            f"{connections} concurrent connections to {address[0]}:{address[1]}"
            " did not finish"
        ) from None


# Starting the pieces


@frozen
class Backends:
    ports: dict[str, int]  # ECHO or SOURCE -> port on 127.0.0.1

    def address(self, kind: str) -> Address:
        return (LOOPBACK, self.ports[kind])


def wait_for_ports(child: Child, portfile: Path, timeout: float) -> dict[str, int]:
    """
    The ports a child of ours writes to C{portfile} once it listens.
    """

    def ports() -> dict[str, int] | None:
        if not portfile.exists():
            return None
        loaded: dict[str, int] = json.loads(portfile.read_text())
        return loaded

    return wait_until(ports, timeout, child.name, [child])


def start_backends(children: Children, workdir: Path) -> tuple[Child, Backends]:
    portfile = workdir / "backends.json"
    script = Path(__file__).with_name("_backends.py")
    child = children.spawn("backends", [sys.executable, str(script), str(portfile)])
    backends = Backends(wait_for_ports(child, portfile, BACKENDS_TIMEOUT))
    for kind in ENDPOINTS:
        if identify(backends.address(kind)) != kind:
            raise NotReady(
                f"the {kind} backend at {backends.address(kind)} does not answer as one"
            )
    return child, backends


def twistd() -> str:
    path = Path(sys.executable).with_name("twistd")
    if not path.exists():
        raise BenchError(
            f"{path} does not exist: install Twisted next to {sys.executable}"
        )
    return str(path)


@frozen
class Devcloud:
    child: Child
    config: Path  # the ngrokd config it wrote
    ingress_port: int  # its ingress's, on 127.0.0.1, from that config


def _free_range(start: int, count: int) -> bool:
    for port in range(start, start + count):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                return False
    return True


def free_start_port(count: int, first: int = DEFAULT_START_PORT) -> int:
    """
    The first of C{count} consecutive ports that are free on 127.0.0.1,
    trying C{first}, then every hundredth port above it.
    """
    for candidate in range(first, 30000, 100):
        if _free_range(candidate, count):
            return candidate
    raise BenchError(f"no {count} free consecutive ports on {LOOPBACK} from {first}")


def start_devcloud(children: Children, workdir: Path, backends: Backends) -> Devcloud:
    """
    Start the devcloud with one endpoint per backend; wait for the ngrokd
    config it writes, whose listeners start at a free port.
    """
    state = workdir / "devcloud"
    argv = [twistd(), "-n", "--pidfile=", "ngrokd-devcloud", "--state", str(state)]
    argv += ["--api-port", "0", "--ingress-port", "0"]
    start_port = free_start_port(len(ENDPOINTS))
    if start_port != DEFAULT_START_PORT:
        progress(
            f"port {DEFAULT_START_PORT} is taken: ngrokd listens from {start_port}"
        )
    argv += ["--start-port", str(start_port)]
    for kind, (host, port) in ENDPOINTS.items():
        backend = backends.address(kind)
        argv += ["--endpoint", f"tcp://{host}:{port}={backend[0]}:{backend[1]}"]
    child = children.spawn("devcloud", argv)
    info_file = state / "devcloud.json"

    def written() -> Path | None:
        try:
            info = json.loads(info_file.read_text())
        except (OSError, ValueError):
            return None  # not written yet
        config = Path(info["config"])
        return config if config.exists() else None

    config = wait_until(written, DEVCLOUD_TIMEOUT, "the devcloud", [child])
    try:
        ingress = load_config(str(config)).config.ingress
    except ConfigError as e:
        raise BenchError(f"the devcloud's config does not load: {e}") from None
    if ingress.host != LOOPBACK:
        raise BenchError(
            f"the devcloud's ingress is {ingress.endpoint}, not on {LOOPBACK}"
        )
    return Devcloud(child, config, ingress.port)


@frozen
class Relay:
    """
    The relay that adds the link's delay, with a port per route.
    """

    child: Child
    ports: dict[str, int]  # route -> the relay's port on 127.0.0.1


#: The relay's route to the devcloud's ingress; the pair's are per service.
INGRESS_ROUTE = "ingress"


def stunnel_route(service: Service) -> str:
    return f"stunnel-{service.name}"


def start_relay(
    children: Children, workdir: Path, delay_ms: float, routes: dict[str, int]
) -> Relay:
    """
    Start the relay with a listener per route (name -> target port).
    """
    portfile = workdir / "relay.json"
    script = Path(__file__).with_name("_relay.py")
    argv = [sys.executable, str(script), f"{delay_ms:g}", str(portfile)]
    argv += [f"{name}={port}" for name, port in routes.items()]
    child = children.spawn("relay", argv)
    return Relay(child, wait_for_ports(child, portfile, RELAY_TIMEOUT))


def write_daemon_config(
    workdir: Path, devcloud: Devcloud, ingress_port: int, settings: Settings
) -> Path:
    """
    ngrokd's configuration: the devcloud's, with the ingress at
    C{ingress_port} on 127.0.0.1 (the devcloud's own, or the relay's), early
    data and the pool's linger as C{settings} say, and the health and
    metrics server on a free port, so that the metrics read are this
    daemon's.
    """
    config = yaml.safe_load(devcloud.config.read_text())
    config["ingressEndpoint"] = f"{LOOPBACK}:{ingress_port}"
    config.setdefault("ingress", {}).update(
        early_data=settings.early_data,
        pool_linger=settings.pool_linger,
        pool_idle_timeout=min(POOL_IDLE_TIMEOUT, settings.pool_linger),
    )
    config.setdefault("server", {})["health_address"] = f"{LOOPBACK}:{free_ports(1)[0]}"
    path = workdir / "ngrokd.yaml"
    path.touch(mode=0o600)  # it holds the devcloud's API key
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@frozen
class Daemon:
    child: Child
    ports: dict[str, int]  # ECHO or SOURCE -> port on 127.0.0.1
    ports_from: str  # how they were found: the state file or probing
    #: Where it dials the ingress (the relay's port with a delay), from its
    #: config's ingressEndpoint.
    ingress_port: int
    health_address: str  # its health and metrics server, host:port

    def address(self, kind: str) -> Address:
        return (LOOPBACK, self.ports[kind])


def _recorded_ports(state_dir: Path) -> dict[str, int] | None:
    """
    The daemon's ports for our endpoints, from its C{network_ports.json}.
    """
    try:
        data = (state_dir / NETWORK_PORTS).read_bytes()
        recorded, _, _ = decode_network_ports(data)
    except (OSError, CorruptStateFile):
        return None
    if not all(endpoint in recorded for endpoint in ENDPOINTS.values()):
        return None
    return {kind: recorded[endpoint] for kind, endpoint in ENDPOINTS.items()}


def _probed_ports(start_port: int) -> dict[str, int] | None:
    """
    The daemon's ports for our endpoints, found by asking each port from
    C{start_port} which backend answers.
    """
    found = {}
    for port in range(start_port, start_port + len(ENDPOINTS)):
        answer = identify((LOOPBACK, port))
        if answer is not None:
            found[answer] = port
    return found if len(found) == len(ENDPOINTS) else None


def _listened_by(child: Child, ports: dict[str, int]) -> bool:
    """
    Whether C{child} itself listens on each of C{ports}: on a machine where
    other runs start daemons too, one of theirs may hold a port ours was
    given, and the same backends would answer there.
    """
    return set(ports.values()) <= listening_ports(child.pid)


def start_daemon(children: Children, devcloud: Devcloud, config_path: Path) -> Daemon:
    """
    Start ngrokd with C{config_path} (L{write_daemon_config}); wait until
    both endpoints' listeners carry a round trip to the right backend.
    """
    try:
        config = load_config(str(config_path)).config
    except ConfigError as e:
        raise BenchError(f"ngrokd's config does not load: {e}") from None
    state_dir = Path(config.server.state_dir)
    argv = [twistd(), "-n", "--pidfile=", "ngrokd", "--config", str(config_path)]
    child = children.spawn("ngrokd", argv)
    ingress_port, health = config.ingress.port, config.server.health_address

    def ready() -> Daemon | None:
        recorded = _recorded_ports(state_dir)
        if recorded is None:
            probed = _probed_ports(config.net.start_port)
            if probed is None or not _listened_by(child, probed):
                return None
            return Daemon(child, probed, "probing", ingress_port, health)
        if not _listened_by(child, recorded):
            return None
        for kind, port in recorded.items():
            answer = identify((LOOPBACK, port))
            if answer is None:
                return None
            if answer != kind:
                raise BenchError(
                    f"{state_dir / NETWORK_PORTS} gives {port} to the {kind}"
                    f" endpoint, but the {answer} backend answers there"
                )
        return Daemon(child, recorded, NETWORK_PORTS, ingress_port, health)

    return wait_until(ready, DAEMON_TIMEOUT, "ngrokd", [devcloud.child, child])


def free_ports(count: int) -> list[int]:
    """
    C{count} distinct ports on 127.0.0.1 that the kernel picks as free, for
    a program that cannot be told to pick its own and say which.
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in socks]


@frozen
class Stunnel:
    client: Child
    server: Child
    ports: dict[str, int]  # ECHO or SOURCE -> the client's port on 127.0.0.1
    version: str

    def address(self, kind: str) -> Address:
        return (LOOPBACK, self.ports[kind])


def stunnel_services(backends: Backends) -> list[Service]:
    """
    A stunnel service per backend, each on two free ports.
    """
    ports = free_ports(2 * len(ENDPOINTS))
    return [
        Service(kind, ports[2 * i], ports[2 * i + 1], backends.ports[kind])
        for i, kind in enumerate(ENDPOINTS)
    ]


def start_stunnel(
    children: Children, workdir: Path, services: Sequence[Service], binary: str
) -> Stunnel:
    """
    Start a stunnel client and server with these services; wait until a
    round trip through each reaches the right backend.
    """
    files = write_pair(workdir / "stunnel", services)
    server = children.spawn("stunnel-server", [binary, str(files.server_config)])
    client = children.spawn("stunnel-client", [binary, str(files.client_config)])
    entry = {s.name: s.client_port for s in services}

    def ready() -> bool | None:
        answers = all(identify((LOOPBACK, entry[kind])) == kind for kind in entry)
        return True if answers else None

    wait_until(ready, STUNNEL_TIMEOUT, "the stunnel pair", [server, client])
    version = describe_version(server.log.read_text(errors="replace"))
    return Stunnel(client, server, entry, version or binary)


# The run


@frozen
class PathResult:
    """
    Every measurement of one path (through the daemon, through the stunnel
    pair, or direct).
    """

    echo: Address
    source: Address
    latency: Latency
    bulk_one: Throughput
    bulk_parallel: Throughput
    concurrency: Concurrency
    #: CPU seconds per 10**9 bytes moved in the bulk phases, per process.
    cpu_seconds_per_gb: dict[str, float]
    #: CPU milliseconds per connection of the concurrency phase, per process.
    cpu_ms_per_connection: dict[str, float]
    #: The highest VmRSS (KiB) of each process during the concurrency phase.
    concurrency_peak_rss_kib: dict[str, int]


@frozen
class Settings:
    latency_connections: int
    bulk_bytes: int
    parallel_connections: int
    parallel_bytes_each: int
    concurrency: int
    direct_only: bool
    #: How long ngrokd is left alone after the last phase before it is read.
    settle_seconds: float
    #: Added each way on the TLS legs by the relay (0: no relay).
    delay_ms: float
    #: ngrokd's ingress.early_data.
    early_data: bool
    #: ngrokd's ingress.pool_linger: part of settle_seconds.
    pool_linger: float


def progress(message: str) -> None:
    print(f"datapath: {message}", file=sys.stderr, flush=True)


def _pids(processes: dict[str, Child]) -> dict[str, int]:
    pids = {name: child.pid for name, child in processes.items()}
    pids["load client"] = os.getpid()
    return pids


def measure_path(
    name: str,
    echo: Address,
    source: Address,
    settings: Settings,
    processes: dict[str, Child],
    around_latency: contextlib.AbstractContextManager[object] | None = None,
) -> PathResult:
    """
    Every measurement, against the echo and source servers at these
    addresses; C{processes} must stay up meanwhile. The latency phase runs
    inside C{around_latency}, if any.
    """
    watch = list(processes.values())

    def check() -> None:
        for child in watch:
            child.check()

    progress(
        f"{name}: {settings.latency_connections} new connections,"
        f" connect to first byte ({echo[0]}:{echo[1]})"
    )
    with around_latency or contextlib.nullcontext():
        latency = measure_latency(echo, settings.latency_connections)
    check()
    pids = _pids(processes)
    before = {who: cpu_seconds(pid) for who, pid in pids.items()}
    progress(f"{name}: 1 connection x {settings.bulk_bytes // MiB} MiB")
    bulk_one = measure_bulk(source, 1, settings.bulk_bytes)
    check()
    progress(
        f"{name}: {settings.parallel_connections} connections"
        f" x {settings.parallel_bytes_each // MiB} MiB"
    )
    bulk_parallel = measure_bulk(
        source, settings.parallel_connections, settings.parallel_bytes_each
    )
    after = {who: cpu_seconds(pid) for who, pid in pids.items()}
    gigabytes = (bulk_one.total_bytes + bulk_parallel.total_bytes) / 1e9
    cpu = {who: (after[who] - before[who]) / gigabytes for who in pids}
    check()
    progress(f"{name}: {settings.concurrency} connections at once")
    before = {who: cpu_seconds(pid) for who, pid in pids.items()}
    with PeakRss(pids) as rss:
        concurrency = measure_concurrency(echo, settings.concurrency)
    after = {who: cpu_seconds(pid) for who, pid in pids.items()}
    per_connection = {
        who: (after[who] - before[who]) * 1000 / settings.concurrency for who in pids
    }
    check()
    return PathResult(
        echo,
        source,
        latency,
        bulk_one,
        bulk_parallel,
        concurrency,
        cpu,
        per_connection,
        rss.peaks_kib,
    )


@frozen
class StunnelRun:
    """
    The stunnel pair's version, and the TLS handshakes its server completed
    during the pair's phases (warm-up connections included).
    """

    version: str
    handshakes: Handshakes


def measure_stunnel(
    pair: Stunnel, settings: Settings, processes: dict[str, Child]
) -> tuple[PathResult, StunnelRun]:
    """
    L{measure_path} through the stunnel pair, and the handshakes its server
    logged meanwhile.
    """
    start = pair.server.log.stat().st_size
    result = measure_path(
        "stunnel", pair.address(ECHO), pair.address(SOURCE), settings, processes
    )
    with open(pair.server.log, "rb") as log:
        log.seek(start)
        handshakes = count_handshakes(log.read())
    return result, StunnelRun(pair.version, handshakes)


def metric_samples(health_address: str) -> list[Sample]:
    """
    Every sample of ngrokd's C{/metrics} now.
    """
    url = f"http://{health_address}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as answer:
            text = answer.read(METRICS_LIMIT).decode("utf-8")
    except (OSError, ValueError) as e:
        raise BenchError(f"reading ngrokd's metrics at {url}: {e}") from None
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


@frozen
class Dials:
    """
    ngrokd's upgraded connections to the ingress by how their TLS handshake
    was made (C{ngrokd_ingress_dials_total}): ahead, in its warm pool
    (pooled), or when accepted, resumed or in full.
    """

    pooled: int
    resumed: int
    full: int

    @classmethod
    def scrape(cls, health_address: str) -> Dials:
        """
        The counts now, from ngrokd's C{/metrics}.
        """
        counts = {
            sample.labels.get("kind"): int(sample.value)
            for sample in metric_samples(health_address)
            if sample.name == "ngrokd_ingress_dials_total"
        }
        kinds = [f.name for f in attrs.fields(cls)]
        if not all(kind in counts for kind in kinds):
            raise BenchError(
                f"{health_address}/metrics does not count"
                " ngrokd_ingress_dials_total of each kind"
                f" {kinds}: {counts}"
            )
        return cls(*(counts[kind] for kind in kinds))

    def __sub__(self, earlier: Dials) -> Dials:
        return Dials(
            self.pooled - earlier.pooled,
            self.resumed - earlier.resumed,
            self.full - earlier.full,
        )


class DialsDuring:
    """
    ngrokd's L{Dials} during a phase: C{counted} once it is over.
    """

    def __init__(self, health_address: str) -> None:
        self._health_address = health_address
        self.counted: Dials | None = None

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        before = Dials.scrape(self._health_address)
        yield
        self.counted = Dials.scrape(self._health_address) - before


@frozen
class Snapshot:
    """
    ngrokd's resident memory and its connections to the ingress, at one time.
    """

    rss_kib: int
    ingress_connections: int

    @classmethod
    def of(cls, daemon: Daemon) -> Snapshot:
        pid = daemon.child.pid
        return cls(
            status_kib(pid, "VmRSS"), established_to_port(pid, daemon.ingress_port)
        )


@frozen
class AtRest:
    """
    ngrokd carrying nothing: after startup, before the first phase (idle),
    and C{settle_seconds} after the last phase (settled). A daemon that lets
    go of what the bursts took is back near its idle RSS, and holds no
    connection to the ingress.
    """

    ingress_port: int
    settle_seconds: float
    idle: Snapshot
    settled: Snapshot


def settle(seconds: float, processes: dict[str, Child]) -> None:
    """
    Wait C{seconds}, checking meanwhile that every process is still up.
    """
    deadline = time.monotonic() + seconds

    def over() -> bool | None:
        return True if time.monotonic() >= deadline else None

    wait_until(over, seconds + STOP_TIMEOUT, "settling", list(processes.values()))


@frozen
class Machine:
    cpus: int
    cpu_model: str
    kernel: str
    python: str
    twisted: str
    openssl: str
    pyopenssl: str
    fd_limit: int

    @classmethod
    def here(cls, fd_limit: int) -> Machine:
        model = "unknown"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        return cls(
            len(os.sched_getaffinity(0)),
            model,
            f"{platform.system()} {platform.release()}",
            f"{platform.python_implementation()} {platform.python_version()}",
            twisted.__version__,
            SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
            OpenSSL.__version__,
            fd_limit,
        )


@frozen
class Report:
    command: str
    machine: Machine
    settings: Settings
    direct: PathResult
    daemon: PathResult | None
    #: name -> pid and peak RSS (KiB) of each process, read at the end.
    processes: dict[str, dict[str, int]]
    daemon_ports_from: str | None
    #: Through the stunnel pair; C{None} without stunnel, or with --direct-only.
    stunnel: PathResult | None
    stunnel_pair: StunnelRun | None
    daemon_at_rest: AtRest | None
    #: ngrokd's dials during its latency phase, warm-up connections included.
    daemon_latency_dials: Dials | None

    @property
    def paths(self) -> dict[str, PathResult | None]:
        return {"daemon": self.daemon, "stunnel": self.stunnel, "direct": self.direct}

    @property
    def failures(self) -> list[str]:
        found = []
        for name, result in self.paths.items():
            if result is not None and result.concurrency.failed:
                c = result.concurrency
                found.append(
                    f"{c.failed} of {c.connections} concurrent connections {name}"
                    f" failed: {c.errors}"
                )
        return found


@frozen
class Target:
    """
    One figure the data path is judged by, and its bound: met when the value
    is at most the bound (C{at_most}), or else at least.
    """

    what: str
    value: float
    bound: float
    at_most: bool
    shown: str  # the value, as the target's line shows it

    @property
    def met(self) -> bool:
        return self.value <= self.bound if self.at_most else self.value >= self.bound

    def line(self) -> str:
        return f"target: {self.what}: {self.shown} ({'met' if self.met else 'missed'})"


def _quotient(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def targets(report: Report) -> dict[str, Target]:
    """
    The targets this run can judge: none without the daemon, and those
    relative to the stunnel pair only with it.
    """
    daemon, pair, rest = report.daemon, report.stunnel, report.daemon_at_rest
    if daemon is None or rest is None:
        return {}
    found: dict[str, Target] = {}

    def relative(
        key: str,
        what: str,
        pick: Callable[[PathResult], float],
        bound: float,
        at_most: bool,
    ) -> None:
        """
        ngrokd's figure over the pair's, against C{bound}.
        """
        value = None if pair is None else _quotient(pick(daemon), pick(pair))
        if value is not None:
            sign = "<=" if at_most else ">="
            text = f"{what} {sign} {bound:.1f}x stunnel's"
            found[key] = Target(text, value, bound, at_most, f"ratio {value:.2f}")

    # Across a link the warm pool and early data save round trips; on
    # loopback there are none to save, only CPU.
    link = report.settings.delay_ms > 0
    p50, p99 = (0.5, 1.0) if link else (1.0, 1.2)
    relative("latency_p50", "new connection p50", lambda r: r.latency.p50_ms, p50, True)
    relative("latency_p99", "new connection p99", lambda r: r.latency.p99_ms, p99, True)
    relative("bulk_one", "1 stream", lambda r: r.bulk_one.mb_per_s, 1.0, False)
    streams = f"{report.settings.parallel_connections} streams"
    relative("bulk_parallel", streams, lambda r: r.bulk_parallel.mb_per_s, 1.0, False)
    cpu = daemon.cpu_seconds_per_gb["ngrokd"]
    client = None if pair is None else pair.cpu_seconds_per_gb.get("stunnel client")
    if client:
        found["cpu_seconds_per_gb"] = Target(
            "ngrokd CPU per GB <= the stunnel client's",
            cpu / client,
            1.0,
            True,
            f"{cpu:.2f} s against {client:.2f} s",
        )
    burst = daemon.concurrency
    found["concurrency_failed"] = Target(
        f"{burst.connections} at once, failed = 0",
        burst.failed,
        0,
        True,
        str(burst.failed),
    )
    relative(
        "concurrency_wall",
        f"{burst.connections} at once, wall",
        lambda r: r.concurrency.wall_seconds,
        0.5,
        True,
    )
    peak_mb = daemon.concurrency_peak_rss_kib["ngrokd"] * 1024 / 1e6
    found["concurrency_peak_rss_mb"] = Target(
        f"ngrokd peak RSS during the {burst.connections} at once <= 250 MB",
        peak_mb,
        250.0,
        True,
        f"{peak_mb:.1f} MB",
    )
    settled = rest.settled.rss_kib / rest.idle.rss_kib
    found["settled_rss_over_idle"] = Target(
        f"ngrokd RSS {rest.settle_seconds:g} s after the last phase <= 1.5x idle",
        settled,
        1.5,
        True,
        f"ratio {settled:.2f}",
    )
    connections = rest.settled.ingress_connections
    found["settled_ingress_connections"] = Target(
        "connections from ngrokd to the ingress after the settle period = 0",
        connections,
        0,
        True,
        str(connections),
    )
    return found


def _ratio(numerator: float | None, denominator: float | None) -> str:
    value = _quotient(numerator, denominator)
    return "-" if value is None else f"{value:.2f}x"


def _rows_table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        pairs = zip(row[1:], widths[1:], strict=True)
        cells += [cell.rjust(width) for cell, width in pairs]
        lines.append("   ".join(cells).rstrip())
    return lines


def _header(report: Report) -> list[str]:
    m = report.machine
    lines = [
        "ngrokd data-path benchmark",
        "",
        f"machine   {m.cpus} CPUs ({m.cpu_model}), {m.kernel}",
        f"software  {m.python}, Twisted {m.twisted}, {m.openssl}"
        f" (pyOpenSSL {m.pyopenssl})",
    ]
    pair = report.stunnel_pair
    if pair is not None:
        lines.append(
            f"baseline  {pair.version}, a mutual-TLS 1.3 pair that resumes sessions"
        )
    elif not report.settings.direct_only:
        lines.append(
            "baseline  none: stunnel is not on PATH (Debian: apt-get install"
            " stunnel4), so ngrokd's and direct figures alone"
        )
    delay = report.settings.delay_ms
    if delay:
        legs = "ngrokd→ingress" + (" and stunnel→stunnel" if pair else "")
        lines.append(f"link      {legs} through a relay adding {delay:g} ms each way")
    if report.daemon is not None:
        s = report.settings
        early = "on" if s.early_data else "off"
        lines.append(
            f"ngrokd    ingress.early_data {early}, ingress.pool_linger"
            f" {s.pool_linger:g} s (half the settle)"
        )
    lines.append(f"command   {report.command}")
    sharing = ["the load client", "the backends"]
    if pair is not None:
        sharing.append("the stunnel pair")
    if report.daemon is not None:
        sharing += ["the devcloud", "ngrokd"]
    if delay:
        sharing.append("the relay")
    note = f"{', '.join(sharing[:-1])} and {sharing[-1]} share these {m.cpus} CPUs"
    if report.daemon is not None and delay:
        cap = WINDOW / (delay / 1000) / 1e6
        note += (
            "; through the daemon, TLS runs in two Python processes (ngrokd and"
            " the devcloud's ingress); the relay's delay adds to every round trip"
            " on the TLS legs, and it holds at most"
            f" {WINDOW // MiB} MiB in flight each way per connection (one"
            f" connection: at most {cap:.0f} MB/s)"
        )
    elif report.daemon is not None:
        note += (
            "; through the daemon, TLS runs in two Python processes (ngrokd and"
            " the devcloud's ingress): the numbers are bounded by CPU here, not by"
            " the network"
        )
    lines += textwrap.wrap(
        note, width=79, initial_indent="note      ", subsequent_indent=" " * 10
    )
    return lines


def _processes_table(report: Report) -> list[str]:
    s = report.settings
    measured = {name: r for name, r in report.paths.items() if r is not None}
    lines = textwrap.wrap(
        "CPU seconds per GB (10^9 bytes) moved in the bulk phases and CPU ms per"
        f" connection of the {s.concurrency} at once, on each path; RSS: the"
        f" highest during the {s.concurrency} at once (on any path), and the peak"
        " over the whole run",
        width=79,
    )
    rows = [
        ["", "daemon", "stunnel", "direct", "daemon", "stunnel", "burst", "peak", ""],
        ["", "s/GB", "s/GB", "s/GB", "ms/conn", "ms/conn", "RSS MiB", "RSS MiB", "pid"],
    ]

    def figure(
        path: str, of: Callable[[PathResult], dict[str, float]], who: str
    ) -> str:
        result = report.paths[path]
        value = None if result is None else of(result).get(who)
        return "-" if value is None else f"{value:.2f}"

    for who, info in report.processes.items():
        burst = max(r.concurrency_peak_rss_kib.get(who, 0) for r in measured.values())
        rows.append(
            [
                who,
                *(
                    figure(path, lambda r: r.cpu_seconds_per_gb, who)
                    for path in ("daemon", "stunnel", "direct")
                ),
                *(
                    figure(path, lambda r: r.cpu_ms_per_connection, who)
                    for path in ("daemon", "stunnel")
                ),
                f"{burst / 1024:.1f}",
                f"{info['peak_rss_kib'] / 1024:.1f}",
                str(info["pid"]),
            ]
        )
    return lines + _rows_table(rows)


def _notes(report: Report) -> list[str]:
    notes = []
    if report.daemon_ports_from:
        notes.append(f"daemon ports found from {report.daemon_ports_from}")
    for name, result in report.paths.items():
        if result is not None:
            notes.append(
                f"{name}: echo {result.echo[0]}:{result.echo[1]},"
                f" source {result.source[0]}:{result.source[1]}"
            )
            if result.concurrency.close_errors:
                notes.append(
                    f"{name}: errors closing after the echo:"
                    f" {result.concurrency.close_errors}"
                )
    if report.stunnel_pair is not None:
        handshakes = report.stunnel_pair.handshakes
        notes.append(
            f"stunnel: its server completed {handshakes.total} TLS handshakes,"
            f" {handshakes.resumed} of them resumed"
        )
    dials = report.daemon_latency_dials
    if dials is not None:
        count = report.settings.latency_connections + WARMUP_CONNECTIONS
        notes.append(
            f"ngrokd: its dials to the ingress during the latency phase ({count}"
            f" connections, warm-up included): {dials.pooled} pooled,"
            f" {dials.resumed} resumed, {dials.full} full"
        )
    rest = report.daemon_at_rest
    if rest is not None:
        port = f"port {rest.ingress_port}"
        if report.settings.delay_ms:
            port = f"through the relay, {port}"
        notes.append(
            f"ngrokd at rest: RSS {rest.idle.rss_kib / 1024:.1f} MiB idle,"
            f" {rest.settled.rss_kib / 1024:.1f} MiB {rest.settle_seconds:g} s"
            f" after the last phase; connections to the ingress ({port}):"
            f" {rest.idle.ingress_connections} idle,"
            f" {rest.settled.ingress_connections} settled"
        )
    return notes


def render(report: Report) -> str:
    s = report.settings

    def row(label: str, pick: Callable[[PathResult], float], fmt: str) -> list[str]:
        values = {
            name: None if r is None else pick(r) for name, r in report.paths.items()
        }
        return [
            label,
            *("-" if v is None else format(v, fmt) for v in values.values()),
            _ratio(values["daemon"], values["direct"]),
            _ratio(values["daemon"], values["stunnel"]),
        ]

    lat = f"connect to first byte ({s.latency_connections} new conns)"
    one = f"bulk, 1 conn x {s.bulk_bytes // MiB} MiB"
    par = f"bulk, {s.parallel_connections} conns x {s.parallel_bytes_each // MiB} MiB"
    conc = f"{s.concurrency} conns at once, one echo each"
    rows = [
        ["", "daemon", "stunnel", "direct", "daemon/direct", "ngrokd/stunnel"],
        row(f"{lat}, p50 (ms)", lambda r: r.latency.p50_ms, ".3f"),
        row(f"{lat}, p90 (ms)", lambda r: r.latency.p90_ms, ".3f"),
        row(f"{lat}, p99 (ms)", lambda r: r.latency.p99_ms, ".3f"),
        row(f"{one} (MB/s)", lambda r: r.bulk_one.mb_per_s, ".1f"),
        row(f"{par} (MB/s)", lambda r: r.bulk_parallel.mb_per_s, ".1f"),
        row(f"{conc}: all echoed (s)", lambda r: r.concurrency.wall_seconds, ".3f"),
        row(f"{conc}: median (s)", lambda r: r.concurrency.p50_seconds, ".3f"),
        row(f"{conc}: failed", lambda r: r.concurrency.failed, "d"),
    ]
    lines = [*_header(report), "", *_rows_table(rows)]
    goals = [target.line() for target in targets(report).values()]
    if goals:
        lines += ["", *goals]
    lines += ["", *_processes_table(report), "", *_notes(report)]
    return "\n".join(lines)


def _ratios(over: PathResult, under: PathResult) -> dict[str, float | None]:
    def of(pick: Callable[[PathResult], float]) -> float | None:
        return _quotient(pick(over), pick(under))

    return {
        "latency_p50": of(lambda r: r.latency.p50_ms),
        "latency_p99": of(lambda r: r.latency.p99_ms),
        "bulk_one": of(lambda r: r.bulk_one.mb_per_s),
        "bulk_parallel": of(lambda r: r.bulk_parallel.mb_per_s),
        "concurrency_wall": of(lambda r: r.concurrency.wall_seconds),
    }


def as_json(report: Report) -> dict[str, Any]:
    data: dict[str, Any] = attrs.asdict(report)
    for name, result in report.paths.items():
        if result is not None:
            data[name]["latency"]["warmup_connections"] = WARMUP_CONNECTIONS
    if report.daemon is not None:
        data["ratios_daemon_over_direct"] = _ratios(report.daemon, report.direct)
        if report.stunnel is not None:
            data["ratios_daemon_over_stunnel"] = _ratios(report.daemon, report.stunnel)
    data["targets"] = {
        key: {
            "what": target.what,
            "value": target.value,
            "bound": target.bound,
            "compare": "<=" if target.at_most else ">=",
            "met": target.met,
        }
        for key, target in targets(report).items()
    }
    data["failures"] = report.failures
    return data


def run(args: argparse.Namespace, children: Children, workdir: Path) -> Report:
    fd_limit = raise_fd_limit()
    quick = args.quick
    settle_seconds = args.settle if args.settle is not None else (5 if quick else 60)
    settings = Settings(
        latency_connections=args.latency or (50 if quick else 300),
        bulk_bytes=(64 if quick else 512) * MiB,
        parallel_connections=PARALLEL_CONNECTIONS,
        parallel_bytes_each=(16 if quick else 128) * MiB,
        concurrency=args.concurrency,
        direct_only=args.direct_only,
        settle_seconds=settle_seconds,
        delay_ms=args.delay,
        early_data=not args.no_early_data,
        pool_linger=max(MIN_LINGER, settle_seconds * LINGER_OF_SETTLE),
    )
    machine = Machine.here(fd_limit)
    progress(f"working in {workdir}")
    stunnel = None if args.direct_only else find_stunnel()
    if stunnel is None and not args.direct_only:
        progress("stunnel is not on PATH: no C baseline, ngrokd and direct alone")
    backends_child, backends = start_backends(children, workdir)
    devcloud: Devcloud | None = None
    if not args.direct_only:
        progress("starting the devcloud")
        devcloud = start_devcloud(children, workdir, backends)
    services = [] if stunnel is None else stunnel_services(backends)
    relay: Relay | None = None
    if devcloud is not None and settings.delay_ms:
        routes = {stunnel_route(s): s.server_port for s in services}
        routes[INGRESS_ROUTE] = devcloud.ingress_port
        progress(f"starting a relay adding {settings.delay_ms:g} ms each way")
        relay = start_relay(children, workdir, settings.delay_ms, routes)
        services = [
            attrs.evolve(s, relay_port=relay.ports[stunnel_route(s)]) for s in services
        ]
    pair: Stunnel | None = None
    if stunnel is not None:
        progress(f"starting a stunnel pair ({stunnel})")
        pair = start_stunnel(children, workdir, services, stunnel)
    daemon: Daemon | None = None
    if devcloud is not None:
        ingress = devcloud.ingress_port if relay is None else relay.ports[INGRESS_ROUTE]
        config = write_daemon_config(workdir, devcloud, ingress, settings)
        progress(f"starting ngrokd with {config}")
        daemon = start_daemon(children, devcloud, config)
    processes: dict[str, Child] = {}
    if daemon is not None and devcloud is not None:
        processes.update(ngrokd=daemon.child, devcloud=devcloud.child)
    if relay is not None:
        processes["relay"] = relay.child
    if pair is not None:
        processes.update({"stunnel client": pair.client, "stunnel server": pair.server})
    processes["backends"] = backends_child
    idle = None
    if daemon is not None:
        settle(IDLE_PAUSE, processes)
        idle = Snapshot.of(daemon)
    direct = measure_path(
        "direct", backends.address(ECHO), backends.address(SOURCE), settings, processes
    )
    through_pair = stunnel_run = None
    if pair is not None:
        through_pair, stunnel_run = measure_stunnel(pair, settings, processes)
    through = at_rest = dials = None
    if daemon is not None and idle is not None:
        dials = DialsDuring(daemon.health_address)
        through = measure_path(
            "daemon",
            daemon.address(ECHO),
            daemon.address(SOURCE),
            settings,
            processes,
            around_latency=dials.counting(),
        )
        progress(f"leaving ngrokd alone for {settings.settle_seconds:g}s")
        settle(settings.settle_seconds, processes)
        at_rest = AtRest(
            daemon.ingress_port, settings.settle_seconds, idle, Snapshot.of(daemon)
        )
    pids = _pids(processes)
    return Report(
        shlex.join([sys.executable, *sys.argv]),
        machine,
        settings,
        direct,
        through,
        {
            name: {"pid": pid, "peak_rss_kib": status_kib(pid, "VmHWM")}
            for name, pid in pids.items()
        },
        daemon.ports_from if daemon else None,
        through_pair,
        stunnel_run,
        at_rest,
        None if dials is None else dials.counted,
    )


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds")
    return value


def _milliseconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= MAX_DELAY_MS:
        raise argparse.ArgumentTypeError(
            f"{text} is not a delay from 0 to {MAX_DELAY_MS} milliseconds"
        )
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="datapath.py",
        description="Measure ngrokd's data path against direct connections,"
        " all on 127.0.0.1.",
    )
    parser.add_argument("--json", metavar="FILE", help="write every number to FILE")
    parser.add_argument(
        "--concurrency",
        type=_positive,
        default=5000,
        metavar="N",
        help="connections opened at once (default 5000)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="50 latency samples, 64 MiB and 8 x 16 MiB bulk, a 5 s settle",
    )
    parser.add_argument(
        "--latency",
        type=_positive,
        metavar="N",
        help="sequential new connections for the latency (default 300, quick 50)",
    )
    parser.add_argument(
        "--settle",
        type=_seconds,
        metavar="SECONDS",
        help="how long ngrokd is left alone after the last phase before its RSS"
        " and its connections to the ingress are read (default 60, quick 5)",
    )
    parser.add_argument(
        "--delay",
        type=_milliseconds,
        default=0.0,
        metavar="MS",
        help="carry ngrokd's leg to the ingress and the stunnel pair's TLS leg"
        " through a relay that adds MS milliseconds each way (default 0: no"
        " relay)",
    )
    parser.add_argument(
        "--no-early-data",
        action="store_true",
        help="run ngrokd with ingress.early_data off: a client's first bytes"
        " wait for the ingress's answer",
    )
    parser.add_argument(
        "--direct-only",
        action="store_true",
        help="measure only the direct path (no devcloud, no daemon)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the working directory (logs, state) after a good run",
    )
    args = parser.parse_args(argv)
    if args.direct_only and args.delay:
        parser.error("--delay delays the TLS legs, which --direct-only does not run")
    return args


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("datapath: Linux only (it reads /proc)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="ngrokd-bench-"))
    children = Children(workdir)
    keep = True
    try:
        with _sigterm_interrupts():
            try:
                report = run(args, children, workdir)
            finally:
                children.stop_all()
        print(render(report))
        if args.json:
            Path(args.json).write_text(json.dumps(as_json(report), indent=2) + "\n")
            progress(f"wrote {args.json}")
        for failure in report.failures:
            print(f"\nFAILED: {failure}", file=sys.stderr)
        keep = bool(report.failures) or args.keep
        return 1 if report.failures else 0
    except KeyboardInterrupt:
        print("datapath: interrupted", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"datapath: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if keep:
            progress(f"logs and state kept in {workdir}")
        else:
            shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
