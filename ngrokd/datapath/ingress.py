# -*- test-case-name: ngrokd.test.test_ingress,ngrokd.test.test_bridge -*-
"""
Connections to ngrok's binding ingress.

Each forwarded connection is a new mutual-TLS connection to the ingress (SNI and
the certificate check use the ingress host, no ALPN), on which the client sends
one framed C{ConnRequest} and reads one framed C{ConnResponse}; after that the
stream belongs to the application. L{IngressConnector.connect} returns the
upgraded connection as a L{PipeProtocol}, or fails with one of the typed errors
below, so callers can say exactly what went wrong. At most C{max_pending}
dials (TCP, TLS and the upgrade) run at once; the others wait their turn in a
L{DialQueue}, and their timeouts start when they leave it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from OpenSSL.SSL import Error as TLSLibraryError
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ngrokd.datapath import wire
from ngrokd.datapath.dial import tcp_client_endpoint
from ngrokd.datapath.dialqueue import DialQueue, QueueTimeout
from ngrokd.datapath.failurelog import FailureLog
from ngrokd.datapath.halfclose import HalfCloseableTLSClientEndpoint
from ngrokd.datapath.resumption import HandshakeCounts, ResumingCreator
from ngrokd.datapath.splice import PipeProtocol
from ngrokd.ngrok.trust import client_creator

#: Distinct notices remembered (and so not logged again); past this, all are
#: forgotten.
MAX_NOTICES_SEEN = 10_000


class IngressError(Exception):
    """
    A connection through the binding ingress could not be set up.
    """

    #: A short name for this kind of failure, for metrics.
    kind = "other"


class DialFailed(IngressError):
    """
    The ingress could not be reached (DNS, refused, unreachable, TCP timeout).
    """

    kind = "dial"


class TLSFailed(IngressError):
    """
    The TLS handshake failed: the ingress's certificate did not verify, or the
    ingress refused ours.
    """

    kind = "tls"


class DialQueueTimeout(IngressError):
    """
    Too many connections were opened at once: this one waited too long for
    its turn to dial the ingress.
    """

    kind = "queue"


class UpgradeTimeout(IngressError):
    """
    The ingress did not finish the handshake or did not answer the upgrade in
    time.
    """

    kind = "timeout"


class UpgradeFailed(IngressError):
    """
    The ingress closed the connection or sent something that is not a
    C{ConnResponse}.
    """

    kind = "upgrade"


class UpgradeRefused(IngressError):
    """
    The ingress answered with an error, e.g. no such endpoint.
    """

    kind = "refused"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code or 'refused'}: {message}")
        self.code = code
        self.message = message


@implementer(IHandshakeListener)
class IngressProtocol(PipeProtocol):
    """
    The client side of the upgrade; after it, one end of a splice.
    """

    log = Logger()

    def __init__(
        self,
        request: wire.ConnRequest,
        clock: IReactorTime,
        connect_timeout: float,
        upgrade_timeout: float,
        server_name: str = "",
    ) -> None:
        super().__init__()
        self.request = request
        self._server_name = server_name
        self.upgraded: Deferred[IngressProtocol] = Deferred(self._cancel)
        self.response: wire.ConnResponse | None = None
        self._clock = clock
        self._connect_timeout = connect_timeout
        self._upgrade_timeout = upgrade_timeout
        self._reader: wire.FrameReader | None = wire.FrameReader()
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        # TCP is up (the endpoint bounds that); bound the TLS handshake too.
        self._timer = self._clock.callLater(
            self._connect_timeout, self._timed_out, "TLS handshake"
        )
        self.transport.setTcpNoDelay(True)
        # Sent now, it leaves with the end of the handshake: no extra round trip.
        self.transport.write(wire.encode_request(self.request))

    def handshakeCompleted(self) -> None:
        self._stop_timer()
        if self._reader is not None:
            self._timer = self._clock.callLater(
                self._upgrade_timeout, self._timed_out, "upgrade response"
            )

    def dataReceived(self, data: bytes) -> None:
        if self._reader is None:
            super().dataReceived(data)
            return
        try:
            result = self._reader.feed(data)
            if result is None:
                return
            payload, rest = result
            response = wire.decode_response(payload)
        except wire.MalformedFrame as e:
            self._fail(UpgradeFailed(str(e)))
            return
        self._reader = None
        self._stop_timer()
        self.response = response
        if response.refused:
            self._fail(UpgradeRefused(response.error_code, response.error_message))
            return
        self.hold(rest)
        self.upgraded.callback(self)

    def readConnectionLost(self) -> None:
        if self._reader is not None:
            self._fail(UpgradeFailed("the ingress closed before answering the upgrade"))
            return
        super().readConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self._reader is not None and not self.upgraded.called:
            self._reader = None
            if reason.check(VerificationError):
                error: IngressError = TLSFailed(
                    f"the ingress's certificate is not for {self._server_name}"
                )
            elif reason.check(TLSLibraryError):
                error = TLSFailed(_describe_tls(reason.value))  # type: ignore[arg-type]
            else:
                error = UpgradeFailed(
                    "the ingress closed the connection before answering the upgrade"
                    f" ({reason.getErrorMessage()})"
                )
            self.upgraded.errback(error)
        super().connectionLost(reason)

    def _fail(self, error: IngressError) -> None:
        self._reader = None
        self._stop_timer()
        if not self.upgraded.called:
            self.upgraded.errback(error)
        self.transport.abortConnection()

    def _timed_out(self, stage: str) -> None:
        self._timer = None
        self._fail(UpgradeTimeout(f"no {stage} from the ingress in time"))

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _cancel(self, d: Deferred[IngressProtocol]) -> None:
        self._reader = None
        self._stop_timer()
        self.transport.abortConnection()


def _describe_tls(error: Exception) -> str:
    reasons = [
        part[2] for part in getattr(error, "args", [[]])[0] if isinstance(part, tuple)
    ]
    return "TLS handshake failed: " + (", ".join(r for r in reasons if r) or str(error))


class IngressConnector:
    """
    Opens upgraded connections to one binding ingress with one client identity.

    The TLS client settings are built once per certificate (L{use_certificate})
    and trust (L{use_trust}, given when the daemon starts: reading a CA bundle
    is I/O) and shared by every connection, which offers to resume the TLS
    session of the last upgraded one (L{ResumingCreator}).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        trust: Any = None,
        connect_timeout: float = 10.0,
        upgrade_timeout: float = 10.0,
        insecure_skip_verify: bool = False,
        max_pending: int = 100,
        queue_timeout: float = 60.0,
    ) -> None:
        self._reactor: IReactorTCP = reactor
        self.clock: IReactorTime = reactor
        self.host = host
        self.port = port
        self._trust = trust
        self._insecure = insecure_skip_verify
        self._connect_timeout = connect_timeout
        self._upgrade_timeout = upgrade_timeout
        self._certificate: ssl.PrivateCertificate | None = None
        self._creator: ResumingCreator | None = None
        #: Upgraded connections by kind of TLS handshake.
        self.handshakes = HandshakeCounts()
        self.queue = DialQueue(reactor, max_pending, queue_timeout)
        #: Where the bridge reports failed connections.
        self.failures = FailureLog(reactor)
        self._notices_seen: set[tuple[str, int, str]] = set()

    def use_certificate(self, cert_pem: bytes, key_pem: bytes) -> None:
        """
        Connect with this client certificate from now on; connections already
        open keep theirs.
        """
        self._certificate = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        self._rebuild()

    def set_timeouts(self, connect_timeout: float, upgrade_timeout: float) -> None:
        """
        Give connections from now on these timeouts.
        """
        self._connect_timeout = connect_timeout
        self._upgrade_timeout = upgrade_timeout

    def use_trust(self, trust: Any) -> None:
        """
        Verify the ingress against C{trust} from now on.
        """
        self._trust = trust
        self._rebuild()

    def _rebuild(self) -> None:
        if self._certificate is None or (self._trust is None and not self._insecure):
            return
        self._creator = ResumingCreator(
            client_creator(self.host, self._trust, self._certificate, self._insecure)
        )

    @property
    def ready(self) -> bool:
        return self._creator is not None

    def connect(self, request: wire.ConnRequest) -> Deferred[IngressProtocol]:
        """
        A new connection to the ingress, upgraded for C{request}, once a dial
        may start.
        """
        if self._creator is None:
            missing = "client certificate" if self._certificate is None else "CA trust"
            raise IngressError(f"no {missing} yet")
        creator = self._creator
        dialing: Deferred[IngressProtocol] | None = None

        def cancel(d: Deferred[IngressProtocol]) -> None:
            if dialing is None:
                turn.cancel()
            else:
                dialing.cancel()

        result: Deferred[IngressProtocol] = Deferred(cancel)

        def admitted(_: object) -> None:
            nonlocal dialing
            dialing = self._dial(creator, request)
            dialing.addBoth(self._dialed, creator)
            dialing.chainDeferred(result)

        def waited_too_long(failure: Failure) -> None:
            if failure.check(QueueTimeout):
                result.errback(DialQueueTimeout(failure.getErrorMessage()))
            elif not failure.check(CancelledError):
                result.errback(failure)

        turn = self.queue.acquire()
        turn.addCallbacks(admitted, waited_too_long)
        return result

    def _dialed(self, result: object, creator: ResumingCreator) -> object:
        self.queue.release()
        if isinstance(result, IngressProtocol) and result.response is not None:
            if creator.completed(result.transport.getHandle()):
                self.handshakes.resumed += 1
            else:
                self.handshakes.full += 1
            self._notices(result.request, result.response.notices)
        elif isinstance(result, Failure) and result.check(TLSFailed):
            creator.failed()
        return result

    def _notices(self, request: wire.ConnRequest, notices: Sequence[str]) -> None:
        """
        Log each notice the ingress gives once per endpoint, not on every
        connection.
        """
        for notice in notices:
            seen = (request.host, request.port, notice)
            if seen in self._notices_seen:
                continue
            if len(self._notices_seen) >= MAX_NOTICES_SEEN:
                self._notices_seen.clear()
            self._notices_seen.add(seen)
            self.log.warn(
                "ingress notice for {host}:{port}: {notice}",
                host=request.host,
                port=request.port,
                notice=notice,
            )

    def _dial(
        self, creator: IOpenSSLClientConnectionCreator, request: wire.ConnRequest
    ) -> Deferred[IngressProtocol]:
        endpoint = HalfCloseableTLSClientEndpoint(
            creator,
            tcp_client_endpoint(
                self._reactor, self.host, self.port, self._connect_timeout
            ),
        )
        protocol = IngressProtocol(
            request,
            self.clock,
            self._connect_timeout,
            self._upgrade_timeout,
            self.host,
        )
        factory = Factory.forProtocol(lambda: protocol)
        factory.noisy = False  # one per connection: the bridge logs what matters
        connecting = endpoint.connect(factory)

        def cancel(d: Deferred[IngressProtocol]) -> None:
            connecting.cancel()
            if protocol.transport is not None:
                protocol.upgraded.cancel()

        result: Deferred[IngressProtocol] = Deferred(cancel)

        def connected(_: object) -> None:
            protocol.upgraded.chainDeferred(result)

        def dial_failed(failure: Failure) -> None:
            if failure.check(CancelledError, ConnectingCancelledError):
                return  # the caller cancelled: the result fails with CancelledError
            if failure.check(ConnectError, DNSLookupError):
                reason = failure.getErrorMessage()
                result.errback(DialFailed(f"{self.host}:{self.port}: {reason}"))
            else:
                result.errback(failure)

        connecting.addCallbacks(connected, dial_failed)
        return result
