# -*- test-case-name: ngrokd.test.test_demo -*-
"""
C{python -m ngrokd.demo}: ngrokd end to end on this machine, unprivileged.

It starts the devcloud (a local stand-in for ngrok's API and binding ingress)
with two bound endpoints, C{http://hello.demo} and C{tcp://echo.demo:7}, whose
backends run inside this process; then ngrokd with the configuration the
devcloud wrote (network mode on 127.0.0.1, so no root is needed). When a
request through ngrokd has come back from the backend it prints the commands
to try, and runs until interrupted (or, with C{--once}, stops at once).
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TextIO

import treq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater, react
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from ngrokd.config import load_config
from ngrokd.datapath.splice import PipeProtocol
from ngrokd.host.allocation import decode_network_ports

HELLO = "http://hello.demo"
ECHO = "tcp://echo.demo:7"


class Options(usage.Options):
    optParameters = [
        [
            "state",
            "s",
            "ngrokd-demo",
            "Directory for the devcloud's and ngrokd's files.",
        ],
        ["start-port", "p", 9080, "First local port ngrokd serves on.", int],
    ]
    optFlags = [["once", None, "Check one request through ngrokd, then stop."]]


class Hello(Resource):
    """
    The backend of C{http://hello.demo}: says which Host it was asked for.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        host = (request.getHeader("host") or "").encode()
        return b"Hello from the backend of http://hello.demo (Host: %s)\n" % host


class Echo(PipeProtocol):
    """
    The backend of C{tcp://echo.demo:7}.
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()


def _script(name: str) -> str:
    """
    The console script C{name} installed beside this Python.
    """
    return os.path.join(os.path.dirname(sys.executable), name)


def _serve(
    reactor: IReactorTCP, factory: IProtocolFactory
) -> tuple[IListeningPort, int]:
    """
    Serve C{factory} on a free port of 127.0.0.1: the port, and its number.
    """
    # Twisted annotates listenTCP's factory as a ServerFactory of one
    # protocol type; any IProtocolFactory will do.
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return port, address.port


def _spawn(argv: list[str], log: TextIO) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


async def _wait(
    clock: IReactorTime, condition: Callable[[], object], what: str, seconds: float = 30
) -> Any:
    for _ in range(int(seconds / 0.1)):
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        await deferLater(clock, 0.1, lambda: None)
    raise SystemExit(f"ngrokd demo: timed out waiting for {what}")


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _network_port(path: str, host: str, port: int) -> int | None:
    try:
        with open(path, "rb") as f:
            ports = decode_network_ports(f.read())[0]
    except (OSError, ValueError):
        return None
    return ports.get((host, port))


def _free(port: int) -> bool:
    with socket.socket() as s:
        # As Twisted's listeners do, so lingering closed connections don't count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def run(reactor: IReactorTCP, options: usage.Options) -> int:
    """
    Run the demo; C{reactor} listens for its backends, and must also
    provide L{IReactorTime} and L{IReactorCore}.
    """
    clock = IReactorTime(reactor)
    state = os.path.abspath(options["state"])
    start_port = options["start-port"]
    if not (_free(start_port) and _free(start_port + 1)):
        raise SystemExit(
            f"ngrokd demo: 127.0.0.1:{start_port} or {start_port + 1} is in use;"
            " pick other ports with --start-port"
        )
    os.makedirs(state, exist_ok=True)
    for stale in ("devcloud.json", "ngrokd.yml"):
        if os.path.exists(os.path.join(state, stale)):
            os.remove(os.path.join(state, stale))
    hello = Hello()  # type: ignore[no-untyped-call]
    web, web_port = _serve(reactor, Site(hello))
    echo, echo_backend_port = _serve(reactor, Factory.forProtocol(Echo))
    children: list[subprocess.Popen[bytes]] = []
    try:
        with open(os.path.join(state, "devcloud.log"), "a") as devcloud_log:
            children.append(
                _spawn(
                    [
                        _script("twistd"),
                        "-n",
                        "--pidfile=",
                        "ngrokd-devcloud",
                        "--state",
                        state,
                        "--api-port",
                        "0",
                        "--ingress-port",
                        "0",
                        "--start-port",
                        str(start_port),
                        "--endpoint",
                        f"{HELLO}=127.0.0.1:{web_port}",
                        "--endpoint",
                        f"{ECHO}=127.0.0.1:{echo_backend_port}",
                    ],
                    devcloud_log,
                )
            )
        info = await _wait(
            clock,
            lambda: _read_json(os.path.join(state, "devcloud.json")),
            "the devcloud",
        )
        config_path = info["config"]
        config = load_config(config_path).config
        with open(os.path.join(state, "ngrokd.log"), "a") as ngrokd_log:
            children.append(
                _spawn(
                    [
                        _script("twistd"),
                        "-n",
                        "--pidfile=",
                        "ngrokd",
                        "--config",
                        config_path,
                    ],
                    ngrokd_log,
                )
            )
        ports_file = os.path.join(config.server.state_dir, "network_ports.json")
        hello_port = await _wait(
            clock, lambda: _network_port(ports_file, "hello.demo", 80), "ngrokd"
        )
        echo_port = _network_port(ports_file, "echo.demo", 7)
        body = await _wait(
            clock,
            lambda: ensureDeferred(_fetch(f"http://127.0.0.1:{hello_port}/")),
            "a first request",
        )
        print(
            f"""
ngrokd is running against the devcloud; logs and state are in {state}.

Through ngrokd, a request to 127.0.0.1:{hello_port} reached http://hello.demo:
  {body.strip()}

Try it:
  curl http://127.0.0.1:{hello_port}/
  echo hello | nc 127.0.0.1 {echo_port}       (tcp://echo.demo:7)
  {_script("ngrokctl")} --socket {config.server.socket_path} list
""",
            flush=True,
        )
        if options["once"]:
            return 0
        print("Press Ctrl-C to stop.", flush=True)
        stopped: Deferred[None] = Deferred()
        IReactorCore(reactor).addSystemEventTrigger(
            "before", "shutdown", stopped.callback, None
        )
        await stopped
        return 0
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        web.stopListening()
        echo.stopListening()


async def _fetch(url: str) -> str | None:
    try:
        response = await treq.get(url, timeout=5, persistent=False)
    except Exception:
        return None
    text: str = await response.text()
    return text if response.code == 200 else None


def main(argv: list[str] | None = None) -> None:
    # Twisted's Options and Resource carry no annotations.
    options: usage.Options = Options()  # type: ignore[no-untyped-call]
    try:
        options.parseOptions(argv if argv is not None else sys.argv[1:])
    except usage.UsageError as e:
        raise SystemExit(f"ngrokd demo: {e}") from None
    react(lambda reactor: ensureDeferred(run(reactor, options)))


if __name__ == "__main__":
    main()
