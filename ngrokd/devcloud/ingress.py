# -*- test-case-name: ngrokd.test.test_devcloud_ingress -*-
"""
The devcloud's binding ingress.

The server side of ngrok's binding protocol: TLS that requires a client
certificate from the cloud's CA, then one framed C{ConnRequest} from the
client. Like ngrok's ingress, it answers with the framed C{ConnResponse} only
once it holds the upstream connection (here: TCP to the endpoint's local
backend), so a success always means the bytes that follow reach the backend,
and a backend that is down is a refusal rather than a connection that opens
and then closes. What the client sends behind its request before the
answer (early data) is held, with reading paused, and passed on after the
response, as ngrok's ingress reads the request's frame and nothing more.
After the response the two connections are one byte pipe
(L{ngrokd.datapath.splice}), half-close and flow control included.

Refusals carry ngrok-style codes:

 - L{ERR_NOT_AN_OPERATOR} (C{ERR_NGROK_107}, ngrok's "credential is
   invalid"): the client certificate is from the cloud's CA but belongs to no
   registered operator (it was deleted);
 - L{ERR_ENDPOINT_NOT_FOUND} (C{ERR_NGROK_3200}, ngrok's "endpoint is
   offline"): no bound endpoint has the request's host and port;
 - L{ERR_UPSTREAM_FAILED} (C{ERR_NGROK_8012}, ngrok's "failed to establish a
   connection to the upstream"): the endpoint's backend refused or timed out.

A client without a certificate from the CA does not get past TLS. For testing
clients, an L{IngressFault} per endpoint adds notices to the response or
replaces the answer with a chosen error, silence, or a hang-up.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from attrs import frozen
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL.crypto import PKey
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IHandshakeListener,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import ClientFactory, Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ngrokd.datapath import wire
from ngrokd.datapath.dial import is_address, tcp_client_endpoint
from ngrokd.datapath.halfclose import HalfCloseableTLSFactory
from ngrokd.datapath.splice import PipeProtocol, splice
from ngrokd.devcloud.cloud import Cloud, CloudEndpoint, split_endpoint_url
from ngrokd.endpoints import join_host_port
from ngrokd.pem import parse_certificates

ERR_NOT_AN_OPERATOR = "ERR_NGROK_107"
ERR_ENDPOINT_NOT_FOUND = "ERR_NGROK_3200"
ERR_UPSTREAM_FAILED = "ERR_NGROK_8012"

#: Seconds a client has, from TCP connect, to finish TLS and send its request.
REQUEST_TIMEOUT = 30.0
#: Seconds to connect to an endpoint's backend.
CONNECT_TIMEOUT = 10.0
#: Connections the kernel queues before the ingress accepts them, so that a
#: burst waits instead of being refused (capped by C{net.core.somaxconn}).
LISTEN_BACKLOG = 4096
#: The largest C{ConnRequest} payload accepted; real ones are a few hundred
#: bytes even with pod annotations.
MAX_REQUEST_SIZE = 16 * 1024


class FaultError(ValueError):
    """
    A fault asks for two answers at once.
    """


@frozen(kw_only=True)
class IngressFault:
    """
    Failure injection for one endpoint's connections.

    C{notices} are added to a successful response. At most one of the others
    replaces the normal answer: a refusal with C{error_code} and
    C{error_message}; C{stall}, read the request and never answer (a client's
    upgrade timeout must fire); C{hang_up}, read the request and close
    without answering.
    """

    notices: tuple[str, ...] = ()
    error_code: str = ""
    error_message: str = ""
    stall: bool = False
    hang_up: bool = False

    def __attrs_post_init__(self) -> None:
        if sum([self.refuses, self.stall, self.hang_up]) > 1:
            raise FaultError(
                "choose one of error_code/error_message, stall and hang_up"
            )

    @property
    def refuses(self) -> bool:
        return bool(self.error_code or self.error_message)


#: The answer of an endpoint without a fault: made once, not per request.
NO_FAULT = IngressFault()


def _set_nodelay(transport: ITransport | None) -> None:
    """
    Turn off Nagle on a TCP transport, or on the TCP under a TLS wrapper (which
    provides its transport's interfaces and passes the call on).
    """
    tcp = ITCPTransport(transport, None)
    if tcp is not None:
        tcp.setTcpNoDelay(True)


def format_backend(backend: tuple[str, int]) -> str:
    """
    C{host:port}, with an IPv6 host in brackets.
    """
    return join_host_port(*backend)


def _address_key(host: str, port: int) -> tuple[str, int]:
    """
    Host and port as the cloud matches them: case and a trailing dot ignored.
    """
    return host.lower().rstrip("."), port


class BackendProtocol(PipeProtocol):
    """
    The ingress's connection to an endpoint's backend; C{connected} is
    called with it once it is up.
    """

    def __init__(self, connected: Callable[[BackendProtocol], object]) -> None:
        super().__init__()
        self._connected = connected

    def connectionMade(self) -> None:
        _set_nodelay(self.transport)
        self._connected(self)


class _BackendDial(ClientFactory):
    """
    One connection to a backend, for one client's request: its protocol
    says when it is up, and a failed connect goes to C{failed}. A backend
    named by its address is dialled with the reactor's C{connectTCP} and
    this factory alone, not through an endpoint's own factory and protocol.
    """

    noisy = False

    def __init__(
        self,
        connected: Callable[[BackendProtocol], object],
        failed: Callable[[Failure], object],
    ) -> None:
        self._connected = connected
        self.failed = failed

    def buildProtocol(self, addr: IAddress | None) -> BackendProtocol:
        return BackendProtocol(self._connected)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.failed(reason)


@implementer(IHandshakeListener)
class IngressProtocol(PipeProtocol):
    """
    One client connection: read the request, connect upstream, answer, splice.
    """

    log = Logger()

    def __init__(self, factory: IngressFactory) -> None:
        super().__init__()
        self.factory = factory
        self.request: wire.ConnRequest | None = None
        self._reader: wire.FrameReader | None = wire.FrameReader()
        self._timer: IDelayedCall | None = None
        #: Gives up the connect to the backend while it is under way.
        self._stop_connecting: Callable[[], object] | None = None
        self._discarding = False
        self._discarded = 0
        #: Whether the response was written.
        self._answered = False

    @property
    def _peer_address(self) -> str:
        address = self.transport.getPeer()
        return f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"

    def connectionMade(self) -> None:
        self.factory.connection_made(self)
        _set_nodelay(self.transport)
        self._timer = self.factory.clock.callLater(
            self.factory.request_timeout, self._request_timed_out
        )

    def handshakeCompleted(self) -> None:
        self.factory.handshakes_total += 1

    def dataReceived(self, data: bytes) -> None:
        if self.request is not None and not self._answered:
            self.factory.early_bytes_total += len(data)
        if self._discarding:
            self._discarded += len(data)
            return
        if self._reader is None:
            super().dataReceived(data)
            return
        got = self._reader.feed(data)
        if got is None:
            if self._reader.buffered > MAX_REQUEST_SIZE + 2:
                self._bad_request(f"request frame over {MAX_REQUEST_SIZE} bytes")
            return
        payload, rest = got
        self._reader = None
        self._cancel_timer()
        if len(payload) > MAX_REQUEST_SIZE:
            self._bad_request(f"request of {len(payload)} bytes")
            return
        try:
            request = wire.decode_request(payload)
        except wire.MalformedFrame as e:
            self._bad_request(str(e))
            return
        self.hold(rest)
        self.request = request
        self.factory.requests_total += 1
        self.factory.early_bytes_total += len(rest)
        self._handle(request)

    def readConnectionLost(self) -> None:
        if self._reader is not None:
            self.log.info(
                "ingress client {peer} closed before sending its request",
                peer=self._peer_address,
            )
            self._cancel_timer()
            self.transport.loseConnection()
        elif self._discarding:
            self.transport.loseConnection()
        else:
            super().readConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._reader is not None and self._timer is not None:
            # Gone before its request and before a timeout: a TLS refusal
            # (no or foreign client certificate) lands here.
            self.log.info(
                "ingress client {peer} left before its request: {reason}",
                peer=self._peer_address,
                reason=reason.getErrorMessage(),
            )
        if self._discarded:
            self.log.info(
                "dropped {count} bytes {peer} sent after its request was not served",
                count=self._discarded,
                peer=self._peer_address,
            )
        self._cancel_timer()
        super().connectionLost(reason)
        if self._stop_connecting is not None:
            self._stop_connecting()
        self.factory.connection_lost(self)

    # The exchange

    def _handle(self, request: wire.ConnRequest) -> None:
        host, port = request.host, request.port
        certificate = self.transport.getPeerCertificate()
        if certificate is None:
            self._refuse(ERR_NOT_AN_OPERATOR, "No client certificate was presented.")
            return
        serial = certificate.get_serial_number()
        if self.factory.cloud.operator_for_serial(serial) is None:
            self._refuse(
                ERR_NOT_AN_OPERATOR,
                f"The client certificate (serial {serial:x}) belongs to no"
                " registered Kubernetes operator: it was revoked, or its"
                " operator was deleted. Register again.",
            )
            return
        fault = self.factory.faults.get(_address_key(host, port), NO_FAULT)
        if fault.hang_up:
            self.log.info(
                "injected hang-up for {host}:{port} from {peer}",
                host=host,
                port=port,
                peer=self._peer_address,
            )
            self._no_pipe()
            self.transport.loseConnection()
            return
        if fault.stall:
            self.log.info(
                "injected stall for {host}:{port} from {peer}: no answer",
                host=host,
                port=port,
                peer=self._peer_address,
            )
            self._no_pipe()
            return
        if fault.refuses:
            self._refuse(fault.error_code, fault.error_message)
            return
        endpoint = self.factory.cloud.find_endpoint(host, port)
        if endpoint is None:
            self._refuse(
                ERR_ENDPOINT_NOT_FOUND,
                f"The endpoint {host}:{port} is offline:"
                " no bound endpoint has that host and port.",
            )
            return
        host, port = endpoint.backend
        dial = _BackendDial(
            partial(self._upstream_ready, endpoint=endpoint, notices=fault.notices),
            partial(self._upstream_failed, endpoint=endpoint),
        )
        timeout = self.factory.connect_timeout
        if is_address(host):
            connector = self.factory.reactor.connectTCP(
                host, port, dial, timeout=timeout
            )
            self._stop_connecting = connector.stopConnecting
        else:
            reactor = self.factory.reactor
            connecting = tcp_client_endpoint(reactor, host, port, timeout).connect(dial)
            connecting.addErrback(dial.failed)
            self._stop_connecting = connecting.cancel

    def _upstream_ready(
        self,
        backend: BackendProtocol,
        endpoint: CloudEndpoint,
        notices: tuple[str, ...],
    ) -> None:
        self._stop_connecting = None
        response = wire.ConnResponse(
            endpoint_id=endpoint.id, proto=endpoint.proto, notices=notices
        )
        self._answered = True
        self.transport.write(wire.encode_response(response))
        self.factory.upgrades_total += 1  # counted, not logged: one per connection
        splice(self, backend, self.factory.clock)

    def _upstream_failed(self, failure: Failure, endpoint: CloudEndpoint) -> None:
        self._stop_connecting = None
        if self._lost:
            self.log.info(
                "ingress client {peer} left while connecting to {url}",
                peer=self._peer_address,
                url=endpoint.url,
            )
            return
        self._refuse(
            ERR_UPSTREAM_FAILED,
            "failed to establish a connection to the upstream"
            f" {format_backend(endpoint.backend)}"
            f" of {endpoint.url}: {failure.getErrorMessage()}",
        )

    def _refuse(self, code: str, message: str) -> None:
        self.log.info(
            "refused {peer}: {error_code}: {error_message}",
            peer=self._peer_address,
            error_code=code,
            error_message=message,
        )
        response = wire.ConnResponse(error_code=code, error_message=message)
        self._answered = True
        self.transport.write(wire.encode_response(response))
        self._no_pipe()
        self.transport.loseConnection()

    def _bad_request(self, problem: str) -> None:
        self.log.warn(
            "closing ingress client {peer}: bad ConnRequest: {problem}",
            peer=self._peer_address,
            problem=problem,
        )
        self._reader = None
        self._cancel_timer()
        self._no_pipe()
        self.transport.loseConnection()

    def _no_pipe(self) -> None:
        """
        No pipe will follow: what the client sends from now on is dropped
        (what came with the request too), and reading resumes so that its
        close is noticed; a paused TLS connection would wait forever for the
        client's close_notify.
        """
        self._discarding = True
        self._discarded += sum(len(data) for data in self._held)
        self._held.clear()
        self.transport.resumeProducing()

    def _request_timed_out(self) -> None:
        self._timer = None
        self.log.info(
            "closing ingress client {peer}: no ConnRequest within {timeout} s",
            peer=self._peer_address,
            timeout=self.factory.request_timeout,
        )
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class IngressFactory(Factory):
    """
    The ingress's application protocol factory (wrap it with L{tls_factory}).

    C{reactor} connects to backends; C{clock} (default: the reactor, which
    then must provide L{IReactorTime}) times requests. C{connections_total}
    counts accepted connections, C{handshakes_total} the TLS handshakes
    completed (what a client's connections cost the ingress),
    C{requests_total} the requests read, C{early_bytes_total} the bytes that
    came behind a request before its answer (a client's early data) and
    C{upgrades_total} successful upgrades; C{active} holds open connections.
    """

    def __init__(
        self,
        cloud: Cloud,
        reactor: IReactorTCP,
        *,
        clock: IReactorTime | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.cloud = cloud
        self.reactor = reactor
        self.clock = clock if clock is not None else IReactorTime(reactor)
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.faults: dict[tuple[str, int], IngressFault] = {}
        self.connections_total = 0
        self.handshakes_total = 0
        self.requests_total = 0
        self.early_bytes_total = 0
        self.upgrades_total = 0
        self.active: set[IngressProtocol] = set()

    noisy = False

    def buildProtocol(self, addr: IAddress | None) -> IngressProtocol:
        return IngressProtocol(self)

    @property
    def carrying(self) -> set[IngressProtocol]:
        """
        The open connections that have sent their request: not the warm ones
        a client keeps ready.
        """
        return {protocol for protocol in self.active if protocol.request is not None}

    def connection_made(self, protocol: IngressProtocol) -> None:
        self.connections_total += 1
        self.active.add(protocol)

    def connection_lost(self, protocol: IngressProtocol) -> None:
        self.active.discard(protocol)

    def inject(self, url: str, fault: IngressFault | None) -> None:
        """
        Apply C{fault} to connections for the endpoint C{url} (its host
        and port, whether or not it is bound); C{None} removes it.

        @raise ngrokd.devcloud.cloud.InvalidEndpointURL: for a bad C{url}.
        """
        _, host, port = split_endpoint_url(url)
        key = _address_key(host, port)
        if fault is None:
            self.faults.pop(key, None)
        else:
            self.faults[key] = fault

    def close_all(self) -> Deferred[None]:
        """
        Abort every open connection (and, through the splice, its backend);
        fires once all have closed.
        """
        closing = []
        for protocol in list(self.active):
            closing.append(protocol.closed)
            if protocol.peer is not None:
                closing.append(protocol.peer.closed)
            protocol.transport.abortConnection()
        done: Deferred[Any] = DeferredList(closing)
        return done.addCallback(lambda _: None)


def server_options(
    cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None = None
) -> ssl.CertificateOptions:
    """
    TLS 1.2+ server settings serving C{cert_pem} (a leaf followed by its
    chain) with C{key_pem}; with C{client_ca_pem}, clients must present a
    certificate that CA issued.

    Sessions resume with tickets: the settings build one TLS context, whose
    ticket keys every connection through them shares.
    """
    leaf, *chain = parse_certificates(cert_pem, "server certificate")
    key = PKey.from_cryptography_key(load_pem_private_key(key_pem, None))  # type: ignore[arg-type]
    client_auth: dict[str, Any] = {}
    if client_ca_pem is not None:
        client_auth = {
            "verify": True,
            "caCerts": list(parse_certificates(client_ca_pem, "client CA")),
            "requireCertificate": True,
        }
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=leaf,
        extraCertChain=chain,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        enableSessionTickets=True,
        **client_auth,
    )


def tls_factory(
    ingress: IngressFactory, options: ssl.CertificateOptions
) -> HalfCloseableTLSFactory:
    """
    The ingress behind TLS with half-close, ready for C{listenTCP}.
    """
    return HalfCloseableTLSFactory(options, False, ingress)
