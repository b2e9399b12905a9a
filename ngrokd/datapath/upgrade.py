# -*- test-case-name: ngrokd.test.test_ingress,ngrokd.test.test_bridge -*-
"""
The upgrade: what makes a TLS connection to ngrok's binding ingress carry
one endpoint's stream.

On a connection just dialled, the client sends one framed C{ConnRequest}
and reads one framed C{ConnResponse}; after that the stream belongs to the
application. L{IngressProtocol} is that exchange and its timeouts, then one
end of a splice; its failures are the typed errors below (the connector
adds those of the dial and its turn). It lives apart
from the connector (L{ngrokd.datapath.ingress}), which decides when and on
which connection an upgrade happens: this module is the protocol, that one
the dialling, queueing and pooling around it.
"""

from __future__ import annotations

from collections.abc import Callable

from OpenSSL.SSL import Error as TLSLibraryError
from service_identity import VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from ngrokd.datapath import wire
from ngrokd.datapath.earlydata import EarlyData
from ngrokd.datapath.splice import PipeProtocol


class IngressError(Exception):
    """
    A connection through the binding ingress could not be set up.
    """

    #: A short name for this kind of failure, for metrics.
    kind = "other"


class TLSFailed(IngressError):
    """
    The TLS handshake failed: the ingress's certificate did not verify, or the
    ingress refused ours.
    """

    kind = "tls"


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

    def __init__(
        self,
        request: wire.ConnRequest | None,
        clock: IReactorTime,
        connect_timeout: float,
        upgrade_timeout: float,
        server_name: str = "",
        early: EarlyData | None = None,
    ) -> None:
        super().__init__()
        self.request = request
        #: The client's first bytes, sent behind the request until the
        #: answer.
        self.early = early
        self._server_name = server_name
        #: For a connection dialled without a request (a warm one): fires
        #: once its TLS handshake is done and it waits for L{upgrade}.
        self.handshaken: Deferred[IngressProtocol] | None = (
            Deferred(self._cancel) if request is None else None
        )
        self.upgraded: Deferred[IngressProtocol] = Deferred(self._cancel)
        self.response: wire.ConnResponse | None = None
        self._clock = clock
        self._connect_timeout = connect_timeout
        self._upgrade_timeout = upgrade_timeout
        self._reader: wire.FrameReader | None = wire.FrameReader()
        self._timer: IDelayedCall | None = None
        #: What the timer waits for.
        self._stage = "TLS handshake"
        self._started = clock.seconds()
        #: Seconds from the dial to the end of the TLS handshake, and from
        #: the request to its answer.
        self.handshake_seconds: float | None = None
        self.answer_seconds: float | None = None
        self._requested = 0.0
        #: Gives up the TCP connect while it is under way; set by the dialler.
        self.stop_connecting: Callable[[], object] | None = None

    def connectionMade(self) -> None:
        # TCP is up (the endpoint bounds that); the TLS handshake has what
        # is left of the same budget.
        left = self._started + self._connect_timeout - self._clock.seconds()
        self._timer = self._clock.callLater(max(0.0, left), self._timed_out)
        self.transport.setTcpNoDelay(True)
        if self.request is not None:
            # Sent now, it leaves with the end of the handshake: no extra
            # round trip.
            self._send_request()

    def handshakeCompleted(self) -> None:
        self.handshake_seconds = self._clock.seconds() - self._started
        if self.handshaken is not None and self.request is None:
            self._stop_timer()
            self.handshaken.callback(self)
        elif self._reader is not None:
            self._await_response()
        else:
            self._stop_timer()

    def upgrade(
        self, request: wire.ConnRequest, early: EarlyData | None = None
    ) -> Deferred[IngressProtocol]:
        """
        Send C{request} on this warm connection, and C{early} behind it;
        fires as L{upgraded}.
        """
        self.request = request
        self.early = early
        self._send_request()
        self._await_response()
        return self.upgraded

    def close(self) -> None:
        """
        Close this connection before its upgrade.
        """
        self._end_upgrade()
        self.transport.loseConnection()

    def _send_request(self) -> None:
        assert self.request is not None
        self._requested = self._clock.seconds()
        self.transport.write(wire.encode_request(self.request))
        if self.early is not None:
            self.early.follow(self.transport.write)

    def _end_upgrade(self) -> None:
        """
        The answer came, or will not: stop its timer, and send nothing more
        early (a retry on a new connection sends what is left).
        """
        self._reader = None
        self._stop_timer()
        early, self.early = self.early, None
        if early is not None:
            early.stop()

    def _await_response(self) -> None:
        """
        Give the answer the upgrade timeout: on a connection dialled with
        its request, the handshake's timer moves on to it (moved later, a
        timer costs the reactor nothing; a new one, a place in its heap).
        """
        self._stage = "upgrade response"
        timer, due = self._timer, self._clock.seconds() + self._upgrade_timeout
        if timer is not None and timer.active() and timer.getTime() <= due:
            timer.reset(self._upgrade_timeout)
            return
        self._stop_timer()
        self._timer = self._clock.callLater(self._upgrade_timeout, self._timed_out)

    @property
    def _awaited(self) -> Deferred[IngressProtocol] | None:
        """
        Where a failure before the upgrade goes: nowhere while a warm
        connection waits for its request.
        """
        if self.handshaken is None or self.request is not None:
            return self.upgraded
        return None if self.handshaken.called else self.handshaken

    def dataReceived(self, data: bytes) -> None:
        if self._reader is None:
            super().dataReceived(data)
            return
        if self.request is None:
            self._fail(UpgradeFailed("the ingress sent data before the request"))
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
        self._end_upgrade()
        self.response = response
        self.answer_seconds = self._clock.seconds() - self._requested
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
        awaiting = self._reader is not None
        awaited = self._awaited
        self._end_upgrade()
        if awaiting and awaited is not None and not awaited.called:
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
            awaited.errback(error)
        super().connectionLost(reason)

    def _fail(self, error: IngressError) -> None:
        awaited = self._awaited
        self._end_upgrade()
        if awaited is not None and not awaited.called:
            awaited.errback(error)
        self.transport.abortConnection()

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(UpgradeTimeout(f"no {self._stage} from the ingress in time"))

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _cancel(self, d: Deferred[IngressProtocol]) -> None:
        self._end_upgrade()
        if self.transport is not None:
            self.transport.abortConnection()
            return
        stop, self.stop_connecting = self.stop_connecting, None
        if stop is not None:
            stop()  # fails the connect at once: the dial was given up


def _describe_tls(error: Exception) -> str:
    reasons = [
        part[2] for part in getattr(error, "args", [[]])[0] if isinstance(part, tuple)
    ]
    return "TLS handshake failed: " + (", ".join(r for r in reasons if r) or str(error))
