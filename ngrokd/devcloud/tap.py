# -*- test-case-name: ngrokd.test.test_devcloud_tap -*-
"""
C{twistd -n ngrokd-devcloud}: ngrok's API and binding ingress, locally.

It keeps its CA in a state directory (so that certificates ngrokd got from an
earlier run still chain to it), serves the API over HTTPS and the binding
ingress over mutual TLS, and writes two files there for its users: an ngrokd
configuration pointing at it (C{ngrokd.yml}) and the addresses and key in
JSON (C{devcloud.json}), both with the ports actually bound, which matters
when they were chosen by the system (port 0). L{start_devcloud} does the same
in-process, for tests.

As with ngrok, the ingress and API certificates chain through an
intermediate CA, and the ingress CA bundle given to ngrokd holds only that
intermediate: ngrokd must accept an intermediate as its trust anchor, exactly
as it has to for ngrok's real ingress.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from typing import Any

from attrs import define, frozen
from cryptography.exceptions import InvalidSignature
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IReactorTCP,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from ngrokd.atomic import read_if_exists, write_atomic
from ngrokd.datapath.halfclose import HalfCloseableTLSFactory
from ngrokd.devcloud.admin import (
    AdminResource,
    BadBackend,
    DevcloudRoot,
    parse_backend,
)
from ngrokd.devcloud.api import api_resource
from ngrokd.devcloud.ca import CertificateAuthority
from ngrokd.devcloud.cloud import Cloud, InvalidEndpointURL, split_endpoint_url
from ngrokd.devcloud.config import POLL_INTERVAL, DaemonSettings, write_daemon_config
from ngrokd.devcloud.ingress import (
    LISTEN_BACKLOG,
    REQUEST_TIMEOUT,
    IngressFactory,
    format_backend,
    server_options,
    tls_factory,
)
from ngrokd.servicetree import Parent

DEFAULT_API_PORT = 4443
DEFAULT_INGRESS_PORT = 4444

#: Files in the state directory.
ROOT_CERT = "ca.crt"
ROOT_KEY = "ca.key"
INGRESS_CA = "ingress-ca.pem"
INGRESS_CA_KEY = "ingress-ca.key"
API_KEY = "api-key"
DAEMON_CONFIG = "ngrokd.yml"
INFO = "devcloud.json"
DAEMON_STATE = "ngrokd"

_log = Logger()

Endpoints = Iterable[tuple[str, tuple[str, int]]]


class DevcloudStateError(Exception):
    """
    The state directory holds files the devcloud cannot use; the message
    names the file.
    """


def _read(path: str) -> bytes | None:
    try:
        return read_if_exists(path)
    except OSError as e:
        raise DevcloudStateError(f"{path}: {e.strerror}") from None


def _load_ca(
    state_dir: str, cert_name: str, key_name: str, chain: bool
) -> CertificateAuthority | None:
    """
    The CA stored as C{cert_name} and C{key_name}, or C{None} when neither
    exists. With C{chain}, leaves it issues are served with its certificate.
    """
    cert_path = os.path.join(state_dir, cert_name)
    key_path = os.path.join(state_dir, key_name)
    cert_pem, key_pem = _read(cert_path), _read(key_path)
    if cert_pem is None and key_pem is None:
        return None
    if cert_pem is None or key_pem is None:
        missing = cert_path if cert_pem is None else key_path
        raise DevcloudStateError(
            f"{missing} is missing while its pair exists; restore it, or remove"
            f" both {cert_name} and {key_name} to start with a new CA"
        )
    try:
        return CertificateAuthority.load(cert_pem, key_pem, cert_pem if chain else b"")
    except ValueError as e:
        raise DevcloudStateError(f"{cert_path} or {key_path}: {e}") from None


def _store_ca(
    state_dir: str, ca: CertificateAuthority, cert_name: str, key_name: str
) -> None:
    write_atomic(os.path.join(state_dir, key_name), ca.key_pem, 0o600)
    write_atomic(os.path.join(state_dir, cert_name), ca.cert_pem, 0o644)


def _issued_by(child: CertificateAuthority, parent: CertificateAuthority) -> bool:
    try:
        child.certificate.verify_directly_issued_by(parent.certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def load_authorities(
    state_dir: str,
) -> tuple[CertificateAuthority, CertificateAuthority]:
    """
    The root CA (signs operators' CSRs) and the intermediate (issues server
    certificates) kept in C{state_dir}, created on first use.

    @raise DevcloudStateError: a CA file is unreadable or lacks its pair.
    """
    root = _load_ca(state_dir, ROOT_CERT, ROOT_KEY, chain=False)
    if root is None:
        root = CertificateAuthority.create("ngrokd devcloud Root CA")
        _store_ca(state_dir, root, ROOT_CERT, ROOT_KEY)
        _log.info("created the devcloud CA in {state_dir}", state_dir=state_dir)
    intermediate = _load_ca(state_dir, INGRESS_CA, INGRESS_CA_KEY, chain=True)
    if intermediate is None or not _issued_by(intermediate, root):
        intermediate = root.intermediate("Intermediate CA")
        _store_ca(state_dir, intermediate, INGRESS_CA, INGRESS_CA_KEY)
        _log.info(
            "created the devcloud intermediate CA {path}",
            path=os.path.join(state_dir, INGRESS_CA),
        )
    return root, intermediate


def load_api_key(state_dir: str) -> str:
    """
    The API key kept in C{state_dir}, generated on first use.
    """
    path = os.path.join(state_dir, API_KEY)
    stored = _read(path)
    if stored is not None and stored.strip():
        return stored.decode("ascii", "replace").strip()
    key = "devcloud_" + secrets.token_urlsafe(24)
    write_atomic(path, key.encode() + b"\n", 0o600)
    return key


class _ClosableTLSFactory(HalfCloseableTLSFactory):
    """
    Server TLS that can close every connection it carries and tell when they
    are all gone.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._drained: list[Deferred[None]] = []

    def unregisterProtocol(self, p: IProtocol) -> None:
        super().unregisterProtocol(p)  # type: ignore[no-untyped-call]
        if not self.protocols:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def close_connections(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        for protocol in list(self.protocols):
            protocol.abortConnection()
        return d


@define
class RunningDevcloud:
    """
    A devcloud serving on its ports.

    Endpoints are bound with C{cloud.add_endpoint(url, (host, port))} and
    unbound with C{cloud.remove_endpoint(url)}; C{cloud.faults} and
    C{ingress.inject} make the API and the ingress misbehave.
    C{ingress.connections_total} counts connections to the ingress.

    @ivar api_url: C{https://host:port}, as in C{config_path}.
    @ivar ingress_endpoint: C{host:port} of the ingress, as in C{config_path}.
    @ivar ingress_address: the same as a (host, port) pair.
    @ivar api_address: the API's (host, port).
    @ivar config_path: the ngrokd configuration pointing here.
    @ivar api_ca_path: what verifies the API (the root CA).
    @ivar ingress_ca_path: what verifies the ingress (the intermediate only).
    """

    cloud: Cloud
    ingress: IngressFactory
    state_dir: str
    api_url: str
    api_key: str
    ingress_endpoint: str
    ingress_address: tuple[str, int]
    api_address: tuple[str, int]
    config_path: str
    info_path: str
    api_ca_path: str
    ingress_ca_path: str
    _ports: list[IListeningPort]
    _api_tls: _ClosableTLSFactory

    def stop(self) -> Deferred[None]:
        """
        Stop listening and close every connection, the ingress's backend
        legs included; fires when all are closed.
        """
        stopping: list[Deferred[Any]] = [
            maybeDeferred(port.stopListening) for port in self._ports
        ]
        stopping += [self.ingress.close_all(), self._api_tls.close_connections()]
        done: Deferred[Any] = DeferredList(stopping, consumeErrors=True)
        return done.addCallback(lambda _: None)


#: Where the registered operators are kept across restarts.
OPERATORS_FILE = "operators.json"


def _keep_operators(cloud: Cloud, path: str) -> None:
    """
    Restore the operators saved in C{path}, and save them there after every
    change, so that ngrokd's stored operator id survives a devcloud restart.
    """
    stored = _read(path)
    if stored is not None:
        try:
            cloud.load_operators(stored)
        except ValueError as e:
            raise DevcloudStateError(f"{path}: {e}") from None
    cloud.on_change = lambda: write_atomic(path, cloud.dump_operators(), 0o600)


def start_devcloud(
    reactor: IReactorTCP,
    state_dir: str,
    endpoints: Endpoints = (),
    *,
    host: str = "127.0.0.1",
    api_port: int = 0,
    ingress_port: int = 0,
    api_key: str | None = None,
    start_port: int = 9080,
    poll_interval: float = POLL_INTERVAL,
    request_timeout: float = REQUEST_TIMEOUT,
) -> RunningDevcloud:
    """
    Serve a devcloud from C{state_dir} (created if missing) on C{host}, bind
    C{endpoints} (URL, (backend host, backend port)) and write C{ngrokd.yml}
    and C{devcloud.json}. Port 0 picks a free port. Listening happens at
    once, so this returns the running devcloud; C{stop()} it when done.

    @raise DevcloudStateError: unusable files in C{state_dir}.
    @raise ngrokd.devcloud.cloud.InvalidEndpointURL: a bad endpoint URL.
    @raise twisted.internet.error.CannotListenError: a port is taken.
    """
    state_dir = os.path.abspath(state_dir)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    root, intermediate = load_authorities(state_dir)
    api_key = api_key or load_api_key(state_dir)
    cloud = Cloud(root, [api_key], ingress_endpoint="")
    _keep_operators(cloud, os.path.join(state_dir, OPERATORS_FILE))
    for url, backend in endpoints:
        cloud.add_endpoint(url, backend)
    names = list(dict.fromkeys([host, "localhost", "127.0.0.1"]))
    cert_pem, key_pem = intermediate.issue_server(names)
    ingress = IngressFactory(cloud, reactor, request_timeout=request_timeout)
    site = Site(Resource())
    api_tls = _ClosableTLSFactory(server_options(cert_pem, key_pem), False, site)
    ports: list[IListeningPort] = []
    # Twisted annotates listenTCP's factory as a ServerFactory, but any
    # IProtocolFactory will do: its own TLS wrapper is a ClientFactory.
    try:
        ports.append(
            reactor.listenTCP(
                ingress_port,
                tls_factory(ingress, server_options(cert_pem, key_pem, root.cert_pem)),  # type: ignore[arg-type]
                backlog=LISTEN_BACKLOG,
                interface=host,
            )
        )
        ports.append(reactor.listenTCP(api_port, api_tls, interface=host))  # type: ignore[arg-type]
        bound_ingress, bound_api = (port.getHost().port for port in ports)  # type: ignore[attr-defined]
        api_url = f"https://{format_backend((host, bound_api))}"
        cloud.ingress_endpoint = format_backend((host, bound_ingress))
        site.resource = DevcloudRoot(
            api_resource(cloud, api_url, IReactorTime(reactor)),
            AdminResource(cloud, ingress),
        )
        running = RunningDevcloud(
            cloud=cloud,
            ingress=ingress,
            state_dir=state_dir,
            api_url=api_url,
            api_key=api_key,
            ingress_endpoint=cloud.ingress_endpoint,
            ingress_address=(host, bound_ingress),
            api_address=(host, bound_api),
            config_path=os.path.join(state_dir, DAEMON_CONFIG),
            info_path=os.path.join(state_dir, INFO),
            api_ca_path=os.path.join(state_dir, ROOT_CERT),
            ingress_ca_path=os.path.join(state_dir, INGRESS_CA),
            ports=ports,
            api_tls=api_tls,
        )
        _write_files(running, start_port, poll_interval)
    except BaseException:
        for port in ports:
            port.stopListening()
        raise
    _log.info(
        "devcloud API at {api_url}, binding ingress at {ingress};"
        " run ngrokd with --config {config}",
        api_url=api_url,
        ingress=running.ingress_endpoint,
        config=running.config_path,
    )
    for endpoint in cloud.endpoints():
        _log.info(
            "bound {url} to backend {backend}",
            url=endpoint.url,
            backend=format_backend(endpoint.backend),
        )
    return running


def _write_files(
    running: RunningDevcloud, start_port: int, poll_interval: float
) -> None:
    write_daemon_config(
        running.config_path,
        DaemonSettings(
            api_url=running.api_url,
            api_key=running.api_key,
            ingress_endpoint=running.ingress_endpoint,
            api_ca_path=running.api_ca_path,
            ingress_ca_path=running.ingress_ca_path,
            state_dir=os.path.join(running.state_dir, DAEMON_STATE),
            start_port=start_port,
            poll_interval=poll_interval,
        ),
    )
    info = {
        "api_url": running.api_url,
        "ingress": running.ingress_endpoint,
        "api_key": running.api_key,
        "ports": {
            "api": running.api_address[1],
            "ingress": running.ingress_address[1],
        },
        "config": running.config_path,
        "api_ca": running.api_ca_path,
        "ingress_ca": running.ingress_ca_path,
    }
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    write_atomic(running.info_path, text.encode(), 0o600)


@frozen
class DevcloudSettings:
    """
    What the command line chose.
    """

    state_dir: str
    host: str
    api_port: int
    ingress_port: int
    endpoints: tuple[tuple[str, tuple[str, int]], ...]
    api_key: str | None
    start_port: int
    poll_interval: float
    request_timeout: float = REQUEST_TIMEOUT


class DevcloudService(Parent):
    """
    Runs L{start_devcloud} when started (a taken port or unusable state fails
    the start, so twistd exits with the reason) and stops it when stopped.
    """

    def __init__(self, reactor: IReactorTCP, settings: DevcloudSettings) -> None:
        super().__init__()
        self._reactor = reactor
        self.settings = settings
        self.devcloud: RunningDevcloud | None = None

    def startService(self) -> None:
        s = self.settings
        self.devcloud = start_devcloud(
            self._reactor,
            s.state_dir,
            s.endpoints,
            host=s.host,
            api_port=s.api_port,
            ingress_port=s.ingress_port,
            api_key=s.api_key,
            start_port=s.start_port,
            poll_interval=s.poll_interval,
            request_timeout=s.request_timeout,
        )
        super().startService()

    def stopService(self) -> Deferred[None]:
        stopping: list[Deferred[Any]] = [super().stopService()]
        if self.devcloud is not None:
            stopping.append(self.devcloud.stop())
            self.devcloud = None
        done: Deferred[Any] = DeferredList(stopping, consumeErrors=True)
        return done.addCallback(lambda _: None)


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a port (0..65535)")
    return port


class Options(usage.Options):
    """
    C{twistd -n ngrokd-devcloud --state DIR [--endpoint URL=HOST:PORT ...]}.
    """

    synopsis = "--state DIR [--endpoint URL=HOST:PORT ...] [options]"
    longdesc = (
        "A local stand-in for ngrok's API and Kubernetes binding ingress. It"
        " keeps its CA and API key in DIR and writes DIR/ngrokd.yml, an ngrokd"
        " configuration that points at it, and DIR/devcloud.json. Each"
        " --endpoint binds an endpoint URL (http://NAME.NAMESPACE or"
        " tcp://NAME.NAMESPACE:PORT) to a local backend HOST:PORT, e.g."
        " --endpoint tcp://db.prod:5432=127.0.0.1:5432."
    )
    optParameters = [
        ["state", "s", None, "Directory for the CA, key and files (required)."],
        ["host", None, "127.0.0.1", "Address the API and ingress listen on."],
        ["api-port", None, DEFAULT_API_PORT, "API port (0: any free port).", _port],
        [
            "ingress-port",
            None,
            DEFAULT_INGRESS_PORT,
            "Binding ingress port (0: any free port).",
            _port,
        ],
        ["api-key", None, None, "API key to accept (default: one kept in DIR)."],
        [
            "start-port",
            None,
            9080,
            "First port ngrokd listens on, in the ngrokd.yml written.",
            _port,
        ],
        [
            "poll-interval",
            None,
            POLL_INTERVAL,
            "ngrokd's discovery interval in seconds, in the ngrokd.yml written.",
            float,
        ],
        [
            "request-timeout",
            None,
            REQUEST_TIMEOUT,
            "Seconds the ingress waits for a connection's request (after TLS)"
            " before closing it: how long an unused warm connection lives.",
            float,
        ],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["endpoints"] = []

    def opt_endpoint(self, value: str) -> None:
        """
        Bind an endpoint URL to a local backend HOST:PORT (repeatable).
        """
        url, equals, backend = value.partition("=")
        if not equals:
            raise usage.UsageError(f"--endpoint {value!r}: expected URL=HOST:PORT")
        try:
            split_endpoint_url(url)
            address = parse_backend(backend)
        except (InvalidEndpointURL, BadBackend) as e:
            raise usage.UsageError(f"--endpoint {value!r}: {e}") from None
        self["endpoints"].append((url, address))

    opt_e = opt_endpoint

    def postOptions(self) -> None:
        if not self["state"]:
            raise usage.UsageError("--state DIR is required")
        if self["start-port"] == 0:
            raise usage.UsageError("--start-port must be 1..65535, got 0")
        for option in ("poll-interval", "request-timeout"):
            if not self[option] > 0:
                raise usage.UsageError(
                    f"--{option} must be positive, got {self[option]}"
                )
        seen: dict[tuple[str, int], str] = {}
        for url, _ in self["endpoints"]:
            _, host, port = split_endpoint_url(url)
            if (host, port) in seen:
                raise usage.UsageError(
                    f"--endpoint {url!r}: {host}:{port} is already bound by"
                    f" --endpoint {seen[host, port]!r}"
                )
            seen[host, port] = url

    def settings(self) -> DevcloudSettings:
        return DevcloudSettings(
            state_dir=os.path.abspath(self["state"]),
            host=self["host"],
            api_port=self["api-port"],
            ingress_port=self["ingress-port"],
            endpoints=tuple(self["endpoints"]),
            api_key=self["api-key"],
            start_port=self["start-port"],
            poll_interval=self["poll-interval"],
            request_timeout=self["request-timeout"],
        )


def makeService(
    options: Options, reactor: IReactorTCP | None = None
) -> DevcloudService:
    """
    The devcloud service; it listens and writes its files when started.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return DevcloudService(reactor, options.settings())
