"""
Virtual mode end to end, the real thing inside a throwaway network and mount
namespace: backends, the devcloud and the daemon run there as processes
(C{twistd -n ngrokd-devcloud}, C{twistd -n ngrokd}) over the namespace's own
loopback; the daemon makes its link (or its fallback) and addresses with
netlink and writes a real hosts file, bind-mounted over C{/etc/hosts} as in
a container; clients connect by name through the system resolver.

Nothing here touches this machine's interfaces, routes or C{/etc/hosts}; the
tests skip, saying why, where namespaces cannot be made (not root, not
Linux). What the daemon decided is read from the outside: the link's
addresses (C{ip}), the listening sockets (C{ss}), the hosts file, the state
files and the daemon's log.

The kill -9 test needs no namespace: it kills a process saving the
allocations at each step of the save and reads what is left.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv6Network, ip_network
from typing import Any, TypeVar
from urllib.parse import quote

import yaml
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.endpoints import parse_endpoint_url
from ngrokd.host import allocation, hosts, ula
from ngrokd.host.allocation import IP_MAPPINGS, NETWORK_PORTS, Allocations
from ngrokd.host.hosts import BEGIN, END
from ngrokd.test.namespace import Namespace, namespace
from ngrokd.test.resolvedns import ResolvedNamespace
from ngrokd.test.test_netif import addresses_by_link, link_kinds

T = TypeVar("T")

#: Bounds on waits, in seconds.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
#: The daemon polls the devcloud this often (seconds), so changes show fast.
POLL_INTERVAL = 0.3
SUBNET = "10.107.0.0/24"
#: The daemon's health server, on the namespace's own loopback.
HEALTH = "127.0.0.1:8081"
START_PORT = 9080

HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"

_TWISTD = [
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
    "-n",
    "--pidfile=",
]

#: An echo server and an HTTP server answering with the Host it got; prints
#: their ports as JSON.
_BACKENDS = r"""
import asyncio, json

async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()

async def web(reader, writer):
    head = await reader.readuntil(b"\r\n\r\n")
    host = b""
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"host:"):
            host = line[5:].strip()
    body = b"host=" + host + b"\n"
    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    writer.close()

async def main():
    a = await asyncio.start_server(echo, "127.0.0.1", 0)
    b = await asyncio.start_server(web, "127.0.0.1", 0)
    print(json.dumps({"echo": a.sockets[0].getsockname()[1],
                      "web": b.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

#: Holds a port on every address, as a local database would; prints "ready".
_HOLDER = r"""
import socket, sys, time
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
time.sleep(600)
"""

#: Connects by name through the system resolver; prints one result per
#: check: the addresses of a name, an HTTP answer, or an echo.
_CLIENT = r"""
import json, socket, sys

def resolve(name, family=0):
    found = socket.getaddrinfo(name, 0, family, proto=socket.IPPROTO_TCP)
    return sorted({a[4][0] for a in found})

def connect(name, port, family):
    if not family:
        return socket.create_connection((name, port), timeout=5)
    address = socket.getaddrinfo(name, port, family, socket.SOCK_STREAM)[0][4]
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(address)
    return s

def exchange(name, port, data, family=0):
    with connect(name, port, family) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got.decode()

def http(name, port):
    request = f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    return exchange(name, port, request.encode()).split("\r\n\r\n", 1)[-1]

results = []
for check in json.loads(sys.argv[1]):
    kind, args = check[0], check[1:]
    try:
        if kind == "resolve":
            results.append(resolve(*args))
        elif kind == "resolve6":
            results.append(resolve(args[0], socket.AF_INET6))
        elif kind == "echo6":
            results.append(
                exchange(args[0], args[1], args[2].encode(), socket.AF_INET6)
            )
        elif kind == "http":
            results.append(http(*args))
        else:
            results.append(exchange(args[0], args[1], args[2].encode()))
    except OSError as e:
        results.append(f"error: {e}")
print(json.dumps(results))
"""

#: The devcloud's admin routes, called from inside the namespace.
_ADMIN = r"""
import json, ssl, sys, urllib.request
info = json.load(open(sys.argv[1]))
method, path, body = sys.argv[2], sys.argv[3], sys.argv[4]
context = ssl.create_default_context(cafile=info["api_ca"])
request = urllib.request.Request(
    info["api_url"] + path, method=method, data=body.encode() or None,
    headers={"Authorization": "Bearer " + info["api_key"],
             "Content-Type": "application/json"})
with urllib.request.urlopen(request, context=context, timeout=10) as answer:
    print(json.dumps(answer.status))
"""


#: GETs argv[1]; prints its status and body.
_GET = r"""
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as answer:
        print(json.dumps([answer.status, answer.read().decode()]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, e.read().decode()]))
"""


def wait_for(
    check: Callable[[], T | None],
    what: str,
    timeout: float,
    explain: Callable[[], str] = lambda: "",
) -> T:
    """
    Poll C{check} until it returns something true, and return that.

    @raise AssertionError: after C{timeout} seconds, saying what was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:g}s\n{explain()}")
        time.sleep(0.05)


class Process:
    """
    A child process; its output goes to C{log} (or, with C{stdout}, its
    standard output to a pipe for L{read_line}).
    """

    def __init__(
        self, name: str, argv: list[str], log: str, stdout: bool = False
    ) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for key in ("NGROK_API_KEY", "NGROKD_HOSTS_PATH"):
            env.pop(key, None)
        self.name = name
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else out,
                stderr=out,
                env=env,
            )

    def read_line(self, timeout: float = START_TIMEOUT) -> str:
        """
        The next line the process prints (when started with C{stdout}).
        """
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"{self.name} printed nothing in {timeout:g}s")
        return self.process.stdout.readline().decode()

    def output(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def tail(self) -> str:
        return f"--- {self.name} log:\n" + "\n".join(self.output().splitlines()[-40:])

    def signal(self, number: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(number)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still runs after {timeout:g}s\n{self.tail()}"
            ) from None

    def stop(self) -> None:
        """
        SIGTERM, then SIGKILL if it is still there after C{STOP_TIMEOUT}.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class World:
    """
    One namespace with backends, a devcloud with the given endpoints, and
    (once started) the daemon, with its hosts file bind-mounted over
    C{/etc/hosts}.
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        endpoints: Sequence[tuple[str, str]],
        subnet: str = SUBNET,
        overrides: dict[str, str] | None = None,
        hosts: str = HOSTS,
        devcloud_host: str = "127.0.0.1",
        dns: dict[str, Any] | None = None,
        resolved: ResolvedNamespace | None = None,
        subnet6: str | None = "",
    ) -> None:
        """
        @param hosts: the hosts file's text before anything runs.
        @param subnet6: C{net.subnet6} (by default none: IPv4 alone; C{None}:
            left to its default).
        @param devcloud_host: the name or address the devcloud's API and
            ingress listen on, and the daemon's configuration names them by.
        @param dns: the daemon's C{dns} settings; by default none of its
            DNS server (these tests are about addresses, listeners and the
            hosts file; names through DNS are L{ngrokd.test.test_names_e2e}'s).
            Never C{auto} nor C{resolved} without C{resolved}: the daemon
            would find this machine's own bus.
        @param resolved: run everything beside this systemd-resolved and
            its bus (the hosts file is then the daemon's alone: the
            namespace's programs read their own C{/etc/hosts}).
        """
        self.case = case
        self.resolved = resolved
        self.ns: Namespace = resolved.ns if resolved else namespace(case)
        self.dir = os.path.abspath(case.mktemp())
        os.makedirs(self.dir)
        self.hosts_path = os.path.join(self.dir, "hosts")
        with open(self.hosts_path, "w") as f:
            f.write(hosts)
        self.state_dir = os.path.join(self.dir, "state")
        self.subnet = ip_network(subnet)
        self.daemon: Process | None = None
        self.daemons = 0
        backends = self.spawn("backends", [sys.executable, "-c", _BACKENDS], True)
        self.ports = json.loads(backends.read_line())
        devcloud_dir = os.path.join(self.dir, "devcloud")
        argv = [
            *_TWISTD,
            "ngrokd-devcloud",
            "--state",
            devcloud_dir,
            "--api-port",
            "0",
            "--ingress-port",
            "0",
            "--host",
            devcloud_host,
        ]
        for url, backend in endpoints:
            argv += ["--endpoint", f"{url}=127.0.0.1:{self.ports[backend]}"]
        self.devcloud = self.spawn("devcloud", argv)
        self.info_path = os.path.join(devcloud_dir, "devcloud.json")
        wait_for(
            lambda: os.path.exists(self.info_path),
            "the devcloud's devcloud.json",
            START_TIMEOUT,
            self.devcloud.tail,
        )
        self.config_path = os.path.join(self.dir, "ngrokd.yml")
        with open(os.path.join(devcloud_dir, "ngrokd.yml")) as f:
            config = yaml.safe_load(f)
        # A short path: a UNIX socket's must fit in 108 bytes.
        sockets = tempfile.mkdtemp(prefix="ngrokd-ctl-")
        case.addCleanup(shutil.rmtree, sockets, True)
        self.socket_path = os.path.join(sockets, "ngrokd.sock")
        config["server"].update(state_dir=self.state_dir, socket_path=self.socket_path)
        config["bound_endpoints"]["poll_interval"] = POLL_INTERVAL
        config["net"] = {
            "interface_name": "ngrokd0",
            "subnet": subnet,
            "listen_interface": "virtual",
            "start_port": START_PORT,
            "overrides": overrides or {},
            "hosts_file": "/etc/hosts",
        }
        if subnet6 is not None:
            config["net"]["subnet6"] = subnet6
        config["server"]["health_address"] = HEALTH
        config["dns"] = {"mode": "off"} if dns is None else dns
        if resolved is not None:
            config["net"]["hosts_file"] = self.hosts_path
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)

    def command(self, argv: Sequence[str]) -> list[str]:
        """
        The command line that runs C{argv} in the namespace: seeing the
        hosts file as the daemon does, or beside resolved.
        """
        if self.resolved is not None:
            return self.resolved.enter(argv)
        return self.ns.command(argv, self.hosts_path)

    def spawn(self, name: str, argv: list[str], stdout: bool = False) -> Process:
        process = Process(
            name,
            self.command(argv),
            os.path.join(self.dir, f"{name}.log"),
            stdout,
        )
        self.case.addCleanup(process.stop)
        return process

    def start_daemon(self, wrapper: Sequence[str] = ()) -> Process:
        """
        Start the daemon, its command line after C{wrapper} (such as
        C{setpriv} with its options).
        """
        self.daemons += 1
        self.daemon = self.spawn(
            f"ngrokd-{self.daemons}",
            [*wrapper, *_TWISTD, "ngrokd", "--config", self.config_path],
        )
        return self.daemon

    def ngrokctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """
        Run C{ngrokctl} against the daemon's control socket.
        """
        ngrokctl = os.path.join(os.path.dirname(sys.executable), "ngrokctl")
        env = dict(os.environ, NGROKD_SOCKET=self.socket_path)
        return subprocess.run(
            [ngrokctl, *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            env=env,
            check=False,
        )

    def get(self, path: str) -> tuple[int, str]:
        """
        The status and body of C{GET path} on the daemon's health server.
        """
        status, body = self.python(_GET, f"http://{HEALTH}{path}")
        return status, body

    def explain(self) -> str:
        daemon = self.daemon.tail() if self.daemon else ""
        return f"{daemon}\n--- hosts:\n{self.hosts()}\n{self.devcloud.tail()}"

    def wait(self, check: Callable[[], T | None], what: str) -> T:
        return wait_for(check, what, START_TIMEOUT, self.explain)

    # What can be seen from outside the daemon

    def hosts(self) -> str:
        with open(self.hosts_path) as f:
            return f.read()

    def section(self) -> list[str] | None:
        """
        The lines of the ngrokd section of the hosts file (None: none).
        """
        lines = self.hosts().splitlines()
        if BEGIN not in lines:
            return None
        start = lines.index(BEGIN)
        return lines[start + 1 : lines.index(END, start)]

    def addresses(self) -> dict[str, set[str]]:
        """
        The subnet's addresses, by link.
        """
        return addresses_by_link(self.ns, self.subnet)

    def link_kind(self) -> str | None:
        return link_kinds(self.ns).get("ngrokd0")

    def listening(self) -> set[str]:
        """
        The listening TCP sockets in the namespace, as C{address:port}.
        """
        result = self.ns.run(["ss", "-Hltn"])
        return {line.split()[3] for line in result.stdout.splitlines() if line}

    def logged(self, text: str) -> list[str]:
        assert self.daemon is not None
        return [line for line in self.daemon.output().splitlines() if text in line]

    def ngrokctl_json(self, *args: str) -> Any:
        """
        What C{ngrokctl ARGS -o json} prints, over the daemon's socket.
        """
        argv = ["-m", "ngrokd.ctl", "--socket", self.socket_path, *args, "-o", "json"]
        result = self.run([sys.executable, *argv])
        if result.returncode != 0:
            raise AssertionError(f"ngrokctl {args} failed:\n{result.stderr}")
        return json.loads(result.stdout)

    def run(
        self, argv: Sequence[str], timeout: float = START_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """
        Run C{argv} in the namespace (see L{command}) and wait for it.
        """
        if self.resolved is not None:
            return self.resolved.run(argv, timeout)
        return self.ns.run(argv, self.hosts_path, timeout)

    def state(self, name: str) -> Any:
        with open(os.path.join(self.state_dir, name)) as f:
            return json.load(f)

    # Acting in the namespace

    def python(self, code: str, *args: str) -> Any:
        """
        Run Python C{code} with C{args} in the namespace (seeing the hosts
        file as the daemon does) and decode the JSON it prints.
        """
        argv = [sys.executable, "-c", code, *args]
        result = self.run(argv)
        if result.returncode != 0:
            raise AssertionError(f"{code[:40]!r}... failed:\n{result.stderr}")
        return json.loads(result.stdout)

    def client(self, *checks: Sequence[Any]) -> list[Any]:
        """
        Run C{checks} in a client in the namespace, which resolves names
        through the system resolver and the bind-mounted hosts file.
        """
        result: list[Any] = self.python(_CLIENT, json.dumps(checks))
        return result

    def admin(self, method: str, path: str, body: Any = None) -> None:
        """
        Call the devcloud's admin API.
        """
        self.python(
            _ADMIN, self.info_path, method, path, json.dumps(body) if body else ""
        )

    def add_endpoint(self, url: str, backend: str) -> None:
        self.admin(
            "POST",
            "/_devcloud/endpoints",
            {"url": url, "backend": f"127.0.0.1:{self.ports[backend]}"},
        )

    def remove_endpoint(self, url: str) -> None:
        self.admin("DELETE", f"/_devcloud/endpoints?url={quote(url, safe='')}")


class VirtualModeTests(SynchronousTestCase):
    """
    ngrokd in virtual mode, in a namespace of its own.
    """

    def test_byName(self) -> None:
        """
        Each hostname gets one address on the link (or its fallback), shared
        by all its ports, and a line in the hosts file; clients connect by
        name, through the daemon and the devcloud, to the backends.
        """
        world = World(
            self,
            [
                ("http://a.test", "web"),
                ("tcp://a.test:5432", "echo"),
                ("tcp://b.test:7000", "echo"),
            ],
        )
        world.start_daemon()
        world.wait(
            lambda: world.section() == ["10.107.0.2\ta.test", "10.107.0.3\tb.test"],
            "a.test and b.test in the hosts file",
        )
        kind = world.link_kind()
        carrier = "ngrokd0" if kind else "lo"
        self.assertEqual(
            world.addresses(), {carrier: {"10.107.0.2/32", "10.107.0.3/32"}}
        )
        self.assertLessEqual(
            {"10.107.0.2:80", "10.107.0.2:5432", "10.107.0.3:7000"},
            world.listening(),
        )
        self.assertEqual(
            world.client(
                ["resolve", "a.test"],
                ["http", "a.test", 80],
                ["echo", "a.test", 5432, "to a"],
                ["echo", "b.test", 7000, "to b"],
            ),
            [["10.107.0.2"], "host=a.test\n", "to a", "to b"],
        )
        getent = world.ns.run(["getent", "hosts", "b.test"], world.hosts_path)
        self.assertEqual(getent.stdout.split(), ["10.107.0.3", "b.test"])
        self.assertEqual(
            len(world.logged("virtual mode: the addresses of 10.107.0.0/24 are on")),
            1,
        )

    def test_sharedHostnameAndOtherWriters(self) -> None:
        """
        Edits another writer makes to the hosts file between two of the
        daemon's writes are kept. Removing one of two endpoints of a
        hostname stops only its listener: the address, the name and the
        other endpoint stay.
        """
        world = World(self, [("http://a.test", "web"), ("tcp://a.test:5432", "echo")])
        world.start_daemon()
        world.wait(lambda: world.section() == ["10.107.0.2\ta.test"], "a.test")
        with open(world.hosts_path, "r+") as f:
            edited = "# mine\n" + f.read().replace("localhost\n", "localhost me\n", 1)
            edited += "10.0.0.9\tmine.test\n"
            f.seek(0)
            f.write(edited)
            f.truncate()
        world.add_endpoint("tcp://c.test:7000", "echo")
        world.wait(
            lambda: world.section() == ["10.107.0.2\ta.test", "10.107.0.3\tc.test"],
            "c.test added",
        )
        self.assertEqual(
            world.hosts(),
            edited.replace(
                "10.107.0.2\ta.test\n", "10.107.0.2\ta.test\n10.107.0.3\tc.test\n"
            ),
        )
        self.assertEqual(
            world.client(["resolve", "mine.test"], ["echo", "c.test", 7000, "c"]),
            [["10.0.0.9"], "c"],
        )
        world.remove_endpoint("tcp://a.test:5432")
        world.wait(
            lambda: "10.107.0.2:5432" not in world.listening(), "5432 stops listening"
        )
        self.assertIn("10.107.0.2:80", world.listening())
        self.assertIn(
            "10.107.0.2/32", world.addresses()["ngrokd0" if world.link_kind() else "lo"]
        )
        self.assertEqual(world.section(), ["10.107.0.2\ta.test", "10.107.0.3\tc.test"])
        self.assertEqual(
            world.client(["http", "a.test", 80], ["echo", "a.test", 5432, "x"])[0],
            "host=a.test\n",
        )

    def test_restart(self) -> None:
        """
        Addresses and network ports stay the same across a clean restart and
        across a kill -9: a clean stop removes the link and the names; after
        a crash the next start adopts the link and replaces the names. A
        network-mode hostname gets no name; local clients use loopback and
        its network port.
        """
        world = World(
            self,
            [
                ("http://a.test", "web"),
                ("tcp://b.test:7000", "echo"),
                ("tcp://n.test:6000", "echo"),
            ],
            overrides={"n.test": "0.0.0.0"},
        )
        names = ["10.107.0.2\ta.test", "10.107.0.3\tb.test"]

        def up(daemon: Process) -> None:
            world.wait(
                lambda: (
                    "wrote 2 names" in daemon.output()
                    and "0.0.0.0:9080" in world.listening()
                ),
                f"{daemon.name} serving",
            )
            self.assertEqual(world.section(), names)
            self.assertEqual(
                world.client(
                    ["http", "a.test", 80],
                    ["echo", "b.test", 7000, "b"],
                    ["echo", "127.0.0.1", 9080, "n"],
                ),
                ["host=a.test\n", "b", "n"],
            )

        daemon = world.start_daemon()
        up(daemon)
        self.assertTrue(world.client(["resolve", "n.test"])[0].startswith("error"))
        state = (world.state(IP_MAPPINGS), world.state(NETWORK_PORTS))
        self.assertEqual(
            state,
            (
                {"a.test": "10.107.0.2", "b.test": "10.107.0.3"},
                {"n.test:6000": 9080},
            ),
        )
        kind = world.link_kind()
        carrier = "ngrokd0" if kind else "lo"
        daemon.signal(signal.SIGTERM)
        daemon.wait()
        self.assertEqual((world.addresses(), world.section()), ({}, None))
        daemon = world.start_daemon()
        up(daemon)
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        self.assertEqual(
            world.addresses(), {carrier: {"10.107.0.2/32", "10.107.0.3/32"}}
        )
        self.assertEqual(world.section(), names)
        up(world.start_daemon())
        self.assertEqual(
            world.addresses(), {carrier: {"10.107.0.2/32", "10.107.0.3/32"}}
        )
        self.assertEqual((world.state(IP_MAPPINGS), world.state(NETWORK_PORTS)), state)
        if kind:
            (adopted,) = world.logged("adopted from an earlier run")
            self.assertIn(f"are on link ngrokd0 ({kind}", adopted)

    def test_portHeldByAnotherProcess(self) -> None:
        """
        An endpoint whose port another process holds is failed, naming that
        process; the other endpoints work; once the port is free it is
        served at the next poll.
        """
        world = World(self, [("http://a.test", "web"), ("tcp://b.test:7000", "echo")])
        holder = world.spawn("holder", [sys.executable, "-c", _HOLDER, "7000"], True)
        self.assertEqual(holder.read_line(), "ready\n")
        world.start_daemon()
        (failed,) = world.wait(
            lambda: world.logged("cannot listen for tcp://b.test:7000"), "b.test failed"
        )
        self.assertIn(
            f"10.107.0.3:7000 is already in use by pid {holder.process.pid} (", failed
        )
        world.wait(lambda: world.section() is not None, "the names")
        self.assertEqual(world.client(["http", "a.test", 80]), ["host=a.test\n"])
        holder.stop()
        world.wait(lambda: "10.107.0.3:7000" in world.listening(), "b.test served")
        self.assertEqual(world.client(["echo", "b.test", 7000, "b"]), ["b"])
        self.assertEqual(len(world.logged("cannot listen for tcp://b.test:7000")), 1)

    def test_failuresStayLocal(self) -> None:
        """
        A hostname that finds no address in a tiny subnet, and an override
        to an address this machine does not have, fail only their own
        endpoints, each with the reason, logged once.
        """
        urls = [(f"http://h{n}.test", "web") for n in range(1, 7)]
        world = World(
            self,
            [*urls, ("tcp://m.test:6000", "echo")],
            subnet="10.107.0.0/29",
            overrides={"m.test": "10.99.0.9"},
        )
        world.start_daemon()
        world.wait(
            lambda: (
                world.section() == [f"10.107.0.{n + 1}\th{n}.test" for n in range(1, 6)]
            ),
            "h1 to h5 named",
        )
        world.wait(
            lambda: world.logged("cannot listen for tcp://m.test:6000"), "m.test"
        )
        time.sleep(3 * POLL_INTERVAL)
        self.assertEqual(
            [
                line.split("] ", 1)[1]
                for line in world.logged("cannot ")
                if "cannot serve" in line or "cannot listen" in line
            ],
            [
                "cannot serve http://h6.test:80: no address left for h6.test: all 5"
                " usable addresses of 10.107.0.0/29 are in use",
                "cannot listen for tcp://m.test:6000: 10.99.0.9 is not an address of"
                " this machine (check net.listen_interface and net.overrides)",
            ],
        )
        results = world.client(["http", "h1.test", 80], ["resolve", "h6.test"])
        self.assertEqual(results[0], "host=h1.test\n")
        self.assertTrue(results[1].startswith("error"), results)

    def test_namesNotOurs(self) -> None:
        """
        Endpoints named C{localhost}, as the API's and ingress's own host
        (here C{api.test}, which the administrator set in the hosts file so
        that the daemon reaches the devcloud), or as a name the administrator
        set to an address of their own, get no address, listener or hosts
        line: the administrator's addresses stay what the resolver answers,
        the daemon keeps reaching ngrok, and C{ngrokctl list} gives each
        one's reason, logged once. The other endpoint is served by name.
        """
        world = World(
            self,
            [
                ("http://a.test", "web"),
                ("http://localhost", "web"),
                ("http://api.test", "web"),
                ("tcp://pinned.test:7000", "echo"),
            ],
            hosts=HOSTS + "127.0.0.1\tapi.test\n192.0.2.77\tpinned.test\n",
            devcloud_host="api.test",
        )
        world.start_daemon()
        world.wait(
            lambda: world.section() == ["10.107.0.2\ta.test"], "a.test named alone"
        )
        self.assertEqual(world.client(["http", "a.test", 80]), ["host=a.test\n"])
        for name, address in (
            ("pinned.test", "192.0.2.77"),
            ("api.test", "127.0.0.1"),
            ("localhost", "127.0.0.1"),
        ):
            getent = world.ns.run(["getent", "ahostsv4", name], world.hosts_path)
            self.assertEqual(
                {line.split()[0] for line in getent.stdout.splitlines()},
                {address},
                name,
            )
        claim = " is not ngrokd's to claim: "
        reasons = {
            "http://localhost": "localhost"
            + claim
            + "it names this machine itself (RFC 6761)",
            "http://api.test": "api.test"
            + claim
            + "it is the ngrok API's host (api.url), which ngrokd must reach",
            "tcp://pinned.test:7000": "pinned.test"
            + claim
            + "the hosts file sets it outside ngrokd's section, and that address"
            " stays",
        }
        rows = {row["url"]: row for row in world.ngrokctl_json("list")}
        self.assertEqual(rows["http://a.test"]["state"], "listening")
        self.assertEqual(
            {url: (rows[url]["state"], rows[url]["reason"]) for url in reasons},
            {url: ("failed", reason) for url, reason in reasons.items()},
        )
        time.sleep(3 * POLL_INTERVAL)
        for url, reason in reasons.items():
            normalised = parse_endpoint_url(url).url
            self.assertEqual(
                len(world.logged(f"cannot serve {normalised}: {reason}")), 1, url
            )
        self.assertEqual(
            world.addresses(),
            {("ngrokd0" if world.link_kind() else "lo"): {"10.107.0.2/32"}},
        )
        self.assertEqual(
            {a for a in world.listening() if a.startswith("10.107.")},
            {"10.107.0.2:80"},
        )


class IPv6Tests(SynchronousTestCase):
    """
    Names with IPv6 addresses too (net.subnet6 left to auto), and a
    namespace without IPv6.
    """

    def test_byNameOverIPv6(self) -> None:
        """
        With net.subnet6 left to its default, each name gets an address of
        the unique local /64 kept in the state directory, on the link beside
        its IPv4 one, both lines in the hosts file: getent ahostsv6 finds
        it, and a client connecting over IPv6 by name reaches the backend
        through the daemon and the devcloud. Status shows both addresses,
        and a restart keeps the block and the address.
        """
        world = World(
            self,
            [("tcp://a.test:5432", "echo"), ("http://a.test", "web")],
            subnet6=None,
        )
        world.start_daemon()
        section = world.wait(
            lambda: (lambda s: s if s and len(s) == 2 else None)(world.section()),
            "a.test's two lines in the hosts file",
        )
        subnet6 = IPv6Network(world.state(ula.GLOBAL_ID_FILE)["subnet"])
        self.assertEqual(subnet6.prefixlen, 64)
        self.assertTrue(subnet6.subnet_of(IPv6Network("fd00::/8")))
        v6 = str(subnet6.network_address + 2)
        self.assertEqual(section, ["10.107.0.2\ta.test", f"{v6}\ta.test"])
        self.assertEqual(world.state(allocation.IP6_MAPPINGS), {"a.test": v6})
        self.assertEqual(world.state(IP_MAPPINGS), {"a.test": "10.107.0.2"})
        carrier = "ngrokd0" if world.link_kind() else "lo"
        self.assertEqual(addresses_by_link(world.ns, subnet6), {carrier: {f"{v6}/128"}})
        self.assertLessEqual(
            {f"[{v6}]:5432", f"[{v6}]:80", "10.107.0.2:5432"}, world.listening()
        )
        getent = world.ns.run(["getent", "ahostsv6", "a.test"], world.hosts_path)
        self.assertEqual(getent.returncode, 0, getent.stderr)
        self.assertEqual({line.split()[0] for line in getent.stdout.splitlines()}, {v6})
        self.assertEqual(
            world.client(
                ["resolve6", "a.test"],
                ["echo6", "a.test", 5432, "over IPv6"],
                ["echo", "a.test", 5432, "over IPv4 or 6"],
            ),
            [[v6], "over IPv6", "over IPv4 or 6"],
        )
        rows = world.wait(
            lambda: (lambda r: r if len(r) == 2 else None)(
                [r for r in world.ngrokctl_json("list") if r["state"] == "listening"]
            ),
            "both endpoints listening",
        )
        self.assertEqual([row["addresses"] for row in rows], [["10.107.0.2", v6]] * 2)
        self.assertEqual(
            sum(row["connections_total"] for row in rows), 2, "both counted"
        )
        status = world.ngrokctl_json("status")
        self.assertEqual(
            (status["ipv6_subnet"], status["ipv6_error"]), (str(subnet6), "")
        )
        assert world.daemon is not None
        world.daemon.stop()
        world.start_daemon()
        world.wait(lambda: world.section() == section, "the same two lines again")
        self.assertEqual(world.state(ula.GLOBAL_ID_FILE)["subnet"], str(subnet6))

    def test_withoutIPv6(self) -> None:
        """
        In a namespace where IPv6 is disabled, names are served over IPv4
        alone: the hosts file has the IPv4 line, clients connect, the daemon
        is ready, says once that IPv6 is unavailable, and status says why;
        the DNS server serves over IPv4 alone, said once.
        """
        world = World(
            self,
            [("tcp://a.test:5432", "echo")],
            dns={"mode": "hosts"},
            subnet6=None,
        )
        for key in ("all", "default"):
            setting = f"net.ipv6.conf.{key}.disable_ipv6=1"
            result = world.ns.run(["sysctl", "-qw", setting])
            self.assertEqual(result.returncode, 0, result.stderr)
        world.start_daemon()
        world.wait(
            lambda: world.section() == ["10.107.0.2\ta.test"], "a.test's IPv4 line"
        )
        self.assertEqual(
            world.client(["echo", "a.test", 5432, "over IPv4"]), ["over IPv4"]
        )
        status = world.ngrokctl_json("status")
        self.assertIn("disable_ipv6", status["ipv6_error"])
        self.assertTrue(status["ready"], status["not_ready_because"])
        (row,) = world.ngrokctl_json("list")
        self.assertEqual(
            (row["state"], row["addresses"]), ("listening", ["10.107.0.2"])
        )
        since = status["last_poll"]
        world.wait(
            lambda: world.ngrokctl_json("status")["last_poll"] > since + 1.0,
            "more polls",
        )
        self.assertEqual(len(world.logged("IPv6 is unavailable")), 1)
        self.assertEqual(len(world.logged("it serves over IPv4 alone")), 1)
        self.assertTrue(
            world.ngrokctl_json("status")["names_via"].endswith(
                "DNS server on 10.107.0.1:53"
            )
        )
        self.assertEqual(world.section(), ["10.107.0.2\ta.test"])


class StopTests(SynchronousTestCase):
    """
    Stopping while something the stop needs is held by another process.
    """

    def test_hostsFileLocked(self) -> None:
        """
        SIGTERM while another process holds the hosts file's lock (and a
        poll's write of the names waits for it): the listeners close at
        once, not when that write gives up; the section the stop cannot
        remove is logged with its names, and left for the next start.
        """
        world = World(self, [("http://a.test", "web"), ("tcp://b.test:7000", "echo")])
        daemon = world.start_daemon()
        names = ["10.107.0.2\ta.test", "10.107.0.3\tb.test"]
        world.wait(lambda: world.section() == names, "the names")
        world.wait(lambda: "10.107.0.3:7000" in world.listening(), "b.test served")
        gave_up = "another process has held its lock"
        with open(world.hosts_path, "rb") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            # Each poll writes the names: the next one now waits for the lock.
            time.sleep(3 * POLL_INTERVAL)
            daemon.signal(signal.SIGTERM)
            world.wait(
                lambda: not {"10.107.0.2:80", "10.107.0.3:7000"} & world.listening(),
                "the listeners closed",
            )
            self.assertEqual(world.logged(gave_up), [], world.explain())
            daemon.wait(timeout=3 * hosts.LOCK_TIMEOUT)
            (left,) = world.logged("stopping: cannot lock /etc/hosts")
            self.assertIn(gave_up, left)
            self.assertIn(
                "the ngrokd section of /etc/hosts stays, with a.test 10.107.0.2,"
                " b.test 10.107.0.3, until the next start replaces it",
                left,
            )
        self.assertEqual(world.section(), names)


class ReadinessTests(SynchronousTestCase):
    """
    Readiness of a daemon that serves nothing it should, seen as a health
    check, a monitor and an operator see it.
    """

    def test_withoutNetAdmin(self) -> None:
        """
        Run without C{CAP_NET_ADMIN} in virtual mode, every endpoint fails
        before it is planned, each with the reason; C{/readyz} answers 503,
        C{ngrokctl health} exits 1 and C{ngrokd_ready} is 0.
        """
        world = World(self, [("http://a.test", "web"), ("tcp://b.test:7000", "echo")])
        world.start_daemon(
            ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"]
        )
        world.wait(
            lambda: len(world.logged("cannot serve ")) == 2, "both endpoints failed"
        )
        status, body = world.get("/readyz")
        self.assertEqual(
            (status, body.splitlines()[0]), (503, "not ready: 0 of 2 listeners are up")
        )
        health = world.ngrokctl("health")
        self.assertEqual(
            (health.returncode, health.stdout),
            (1, "not ready: 0 of 2 listeners are up\n"),
            health.stderr,
        )
        metrics = world.get("/metrics")[1].splitlines()
        self.assertIn("ngrokd_ready 0.0", metrics)


#: Saves C{NEW} in the state directory argv[1] and stops for good at the
#: argv[2]-th step of the save (a file, directory or rename call), saying
#: which; prints the number of steps when it gets to the end.
_SAVE = r"""
import os, signal, sys, tempfile
from ipaddress import ip_address
from ngrokd.endpoints import parse_endpoint_url
from ngrokd.host import allocation, hosts
state_dir, stop_at = sys.argv[1], int(sys.argv[2])
steps = 0
def trap(name, real):
    def step(*args, **kwargs):
        global steps
        steps += 1
        if steps == stop_at:
            print(name, flush=True)
            signal.pause()
        return real(*args, **kwargs)
    return step
for name in ("makedirs", "open", "fchmod", "fsync", "replace", "rename"):
    setattr(os, name, trap(name, getattr(os, name)))
tempfile.mkstemp = trap("mkstemp", tempfile.mkstemp)
allocation.save(state_dir, allocation.Allocations(
    {"a.test": ip_address("10.107.0.2"), "b.test": ip_address("10.107.0.3")},
    {("n.test", 6000): 9080, ("n.test", 80): 9081},
))
print("done", steps, flush=True)
"""

OLD = Allocations({"a.test": ip_network("10.107.0.9/32").network_address}, {})
NEW = Allocations(
    {
        "a.test": ip_network("10.107.0.2/32").network_address,
        "b.test": ip_network("10.107.0.3/32").network_address,
    },
    {("n.test", 6000): 9080, ("n.test", 80): 9081},
)


class CrashDuringSaveTests(SynchronousTestCase):
    """
    The allocation files survive a kill -9 at any step of a save.
    """

    def save(self, state_dir: str, stop_at: int) -> Process:
        process = Process(
            "save",
            [sys.executable, "-c", _SAVE, state_dir, str(stop_at)],
            f"{state_dir}.log",
            stdout=True,
        )
        self.addCleanup(process.stop)
        return process

    def test_killedAtEachStep(self) -> None:
        """
        Killed between any two steps of a save, each file holds exactly its
        old or its new content, loads without being moved aside, and the
        next save completes.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        done = self.save(os.path.join(base, "probe"), 0)
        words = done.read_line().split()
        self.assertEqual(words[0], "done", done.tail())
        steps = int(words[1])
        self.assertGreaterEqual(steps, 10)
        subnet = ip_network(SUBNET)
        seen: set[tuple[bool, bool]] = set()
        for stop_at in range(1, steps + 1):
            state_dir = os.path.join(base, str(stop_at))
            allocation.save(state_dir, OLD)
            process = self.save(state_dir, stop_at)
            self.assertNotEqual(process.read_line(), "", process.tail())
            process.signal(signal.SIGKILL)
            process.wait()
            files = {}
            for name, old, new in (
                (
                    IP_MAPPINGS,
                    allocation.encode_ips(OLD.ips),
                    allocation.encode_ips(NEW.ips),
                ),
                (
                    NETWORK_PORTS,
                    allocation.encode_network_ports(OLD.network_ports, {}),
                    allocation.encode_network_ports(NEW.network_ports, {}),
                ),
            ):
                with open(os.path.join(state_dir, name), "rb") as f:
                    content = f.read()
                self.assertIn(content, (old, new), f"{name} after step {stop_at}")
                files[name] = content == new
            loaded = allocation.load(state_dir, subnet)
            self.assertEqual(loaded.ips, (NEW if files[IP_MAPPINGS] else OLD).ips)
            self.assertEqual(
                loaded.network_ports,
                (NEW if files[NETWORK_PORTS] else OLD).network_ports,
            )
            self.assertEqual([n for n in os.listdir(state_dir) if "corrupt" in n], [])
            seen.add((files[IP_MAPPINGS], files[NETWORK_PORTS]))
            allocation.save(state_dir, NEW)
            self.assertEqual(allocation.load(state_dir, subnet).ips, NEW.ips)
        self.assertEqual(seen, {(False, False), (True, False), (True, True)})
