# -*- test-case-name: ngrokd.test.test_ingress,ngrokd.test.test_bridge -*-
"""
Connections to ngrok's binding ingress.

Each forwarded connection is a new mutual-TLS connection to the ingress (SNI and
the certificate check use the ingress host, no ALPN), upgraded for one
endpoint by L{IngressProtocol} (L{ngrokd.datapath.upgrade}); after that the
stream belongs to the application. With L{EarlyData}, the client's first
bytes follow the request without waiting for the response.
L{IngressConnector.connect} returns the upgraded connection as a
L{PipeProtocol}, or fails with one of the typed errors of
L{ngrokd.datapath.upgrade} or below, so callers can say exactly what went
wrong. This module decides when and on which connection an upgrade happens:
the TLS settings, the warm pool, and the dials. At most C{max_pending}
dials (TCP, TLS and the upgrade) run at once; the others wait their turn in a
L{DialQueue}, and their timeouts start when they leave it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from attrs import define
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    DNSLookupError,
)
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ngrokd.datapath import wire
from ngrokd.datapath.descriptors import DescriptorReserve
from ngrokd.datapath.dial import ResolvedName
from ngrokd.datapath.dialqueue import DialQueue, QueueTimeout
from ngrokd.datapath.earlydata import EarlyData
from ngrokd.datapath.failurelog import FailureLog
from ngrokd.datapath.halfclose import (
    HalfCloseableTLSClientEndpoint,
    HalfCloseableTLSFactory,
)
from ngrokd.datapath.pool import NO_POOL, PoolSettings, WarmPool
from ngrokd.datapath.resumption import HandshakeCounts, ResumingCreator
from ngrokd.datapath.tlsbuffers import release_buffers_soon
from ngrokd.datapath.upgrade import (
    IngressError,
    IngressProtocol,
    TLSFailed,
    UpgradeFailed,
    UpgradeRefused,
)
from ngrokd.ngrok.trust import client_creator

T = TypeVar("T")

#: Distinct notices remembered (and so not logged again); past this, all are
#: forgotten.
MAX_NOTICES_SEEN = 10_000


class DialFailed(IngressError):
    """
    The ingress could not be reached (DNS, refused, unreachable, TCP timeout).
    """

    kind = "dial"


class DialQueueTimeout(IngressError):
    """
    Too many connections were opened at once: this one waited too long for
    its turn to dial the ingress.
    """

    kind = "queue"


@define(eq=False)
class WarmConnection:
    """
    A connection in the warm pool, with the TLS settings that made it.
    """

    protocol: IngressProtocol
    creator: ResumingCreator

    @property
    def closed(self) -> Deferred[None]:
        return self.protocol.closed

    def close(self) -> None:
        self.protocol.close()


class IngressConnector:
    """
    Opens upgraded connections to one binding ingress with one client identity.

    The TLS client settings are built once per certificate (L{use_certificate})
    and trust (L{use_trust}, given when the daemon starts: reading a CA bundle
    is I/O) and shared by every connection, which offers to resume the TLS
    session of the last upgraded one (L{ResumingCreator}). A connection is
    taken from the L{WarmPool} when one is ready; otherwise it is dialled,
    in its turn. C{early_data} tells the bridge whether to send the client's
    first bytes behind the request (L{EarlyData}).

    @param reactor: dials the ingress; it must also provide L{IReactorTime}
        and, for an ingress named by a host name, L{IReactorThreads} (see
        L{ResolvedName}).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTCP,
        host: str,
        port: int,
        trust: Any = None,
        connect_timeout: float = 10.0,
        upgrade_timeout: float = 10.0,
        insecure_skip_verify: bool = False,
        max_pending: int = 100,
        queue_timeout: float = 60.0,
        pool: PoolSettings = NO_POOL,
        early_data: bool = True,
    ) -> None:
        self.clock = IReactorTime(reactor)
        self._reactor = reactor
        self.host = host
        self.port = port
        self._address = ResolvedName(reactor, host)
        self._trust = trust
        self._insecure = insecure_skip_verify
        self._connect_timeout = connect_timeout
        self._upgrade_timeout = upgrade_timeout
        self.early_data = early_data
        self._certificate: ssl.PrivateCertificate | None = None
        self._creator: ResumingCreator | None = None
        #: Upgraded connections by how they got their TLS handshake.
        self.handshakes = HandshakeCounts()
        self.queue = DialQueue(self.clock, max_pending, queue_timeout)
        self.pool: WarmPool[WarmConnection] = WarmPool(
            self.clock, self._dial_warm, pool
        )
        #: Where the bridge and the pool report failed connections.
        self.failures = FailureLog(self.clock)
        #: Descriptors set aside for the legs of accepted connections.
        self.descriptors = DescriptorReserve()
        self._notices_seen: set[tuple[str, int, str]] = set()
        #: The TLS factory of the newest client settings, with them.
        self._tls: (
            tuple[IOpenSSLClientConnectionCreator, HalfCloseableTLSFactory] | None
        ) = None

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

    def stop(self) -> None:
        """
        Close the warm connections, dial no more of them, and log the last
        summary of failures.
        """
        self.pool.stop()
        self.failures.stop()
        self.descriptors.close()

    def _rebuild(self) -> None:
        if self._certificate is None or (self._trust is None and not self._insecure):
            return
        self._creator = ResumingCreator(
            client_creator(self.host, self._trust, self._certificate, self._insecure)
        )
        self.pool.reset()

    @property
    def ready(self) -> bool:
        return self._creator is not None

    def connect(
        self, request: wire.ConnRequest, early: EarlyData | None = None
    ) -> Deferred[IngressProtocol]:
        """
        A connection to the ingress, upgraded for C{request}: a warm one if
        the pool has one, else a new one once a dial may start. What
        C{early} is offered goes right behind the request.
        """
        if self._creator is None:
            missing = "client certificate" if self._certificate is None else "CA trust"
            raise IngressError(f"no {missing} yet")
        warm = self.pool.take()
        if warm is not None:
            return self._upgrade_warm(warm, request, early)
        return self._dial_in_turn(self._creator, request, early)

    def _upgrade_warm(
        self,
        warm: WarmConnection,
        request: wire.ConnRequest,
        early: EarlyData | None,
    ) -> Deferred[IngressProtocol]:
        """
        Send C{request} on a warm connection. If it fails before the
        ingress answers (it was closed as it was taken) and no byte of the
        application's has been sent, the request is tried once more on a
        new connection; once one has, the failure is the caller's, as the
        ingress may have passed it on.
        """
        upgrading = warm.protocol.upgrade(request, early)
        retry: Deferred[IngressProtocol] | None = None

        def cancel(d: Deferred[IngressProtocol]) -> None:
            (upgrading if retry is None else retry).cancel()

        result: Deferred[IngressProtocol] = Deferred(cancel)

        def answered(outcome: IngressProtocol | Failure) -> None:
            nonlocal retry
            lost = isinstance(outcome, Failure) and outcome.check(
                UpgradeFailed, TLSFailed
            )
            if lost:
                self.pool.failed()
            if lost and (early is None or not early.sent):
                creator = self._creator
                assert creator is not None
                retry = self._dial_in_turn(creator, request, early)
                retry.chainDeferred(result)
                return
            self._finished(outcome, warm.creator, pooled=True)
            if isinstance(outcome, Failure):
                if not outcome.check(CancelledError):
                    result.errback(outcome)
            else:
                result.callback(outcome)
            self._replace(outcome, pooled=True)

        upgrading.addBoth(answered)
        return result

    def _dial_in_turn(
        self,
        creator: ResumingCreator,
        request: wire.ConnRequest,
        early: EarlyData | None = None,
    ) -> Deferred[IngressProtocol]:
        """
        A new connection upgraded for C{request}, dialled when the
        L{DialQueue} lets it.
        """
        dialing: Deferred[IngressProtocol] | None = None

        def cancel(d: Deferred[IngressProtocol]) -> None:
            if dialing is None:
                turn.cancel()
            else:
                dialing.cancel()

        result: Deferred[IngressProtocol] = Deferred(cancel)

        def admitted(_: object) -> None:
            nonlocal dialing
            dialing = self._dial(creator, request, early)
            dialing.addBoth(dialed)

        def dialed(outcome: IngressProtocol | Failure) -> None:
            self._finished(outcome, creator, pooled=False)
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)
            self._released(outcome)
            self._replace(outcome, pooled=False)

        def waited_too_long(failure: Failure) -> None:
            if failure.check(QueueTimeout):
                result.errback(DialQueueTimeout(failure.getErrorMessage()))
            elif not failure.check(CancelledError):
                result.errback(failure)

        turn = self.queue.acquire()
        turn.addCallbacks(admitted, waited_too_long)
        return result

    def _finished(self, result: object, creator: ResumingCreator, pooled: bool) -> None:
        """
        Count an upgraded connection by its handshake, keep its TLS session,
        give back the buffers its handshake grew, and log its notices; after
        a TLS failure, offer no session. Before the caller has the result.
        """
        if isinstance(result, IngressProtocol) and result.response is not None:
            assert result.request is not None  # answered, so it was sent
            connection = result.transport.getHandle()
            resumed = creator.completed(connection)
            release_buffers_soon(self.clock, connection)
            if pooled:
                self.handshakes.pooled += 1
            elif resumed:
                self.handshakes.resumed += 1
            else:
                self.handshakes.full += 1
            self._notices(result.request, result.response.notices)
        elif isinstance(result, Failure) and result.check(TLSFailed):
            creator.failed()

    def _replace(self, result: object, pooled: bool) -> None:
        """
        The ingress answered (or refused) the request: the pool replaces
        the connection taken. After the caller has the result, so that its
        client's bytes go before the replacement is dialled.
        """
        if isinstance(result, IngressProtocol) and result.response is not None:
            # A warm connection's wait is the request's alone.
            self.pool.answered(result.answer_seconds if pooled else None)
        elif isinstance(result, Failure) and result.check(UpgradeRefused):
            self.pool.answered()

    def _dial_warm(self) -> Deferred[WarmConnection] | None:
        """
        A warm connection, once its TLS handshake is done; C{None} when
        there are no TLS settings yet or no dial may start now: warm dials
        count against the dials in progress, and wait for none.
        """
        creator = self._creator
        if creator is None or not self.queue.try_acquire():
            return None

        dialing = self._dial(creator, None)
        dialing.addBoth(self._released)
        dialing.addErrback(self._warm_failed)
        return dialing.addCallback(WarmConnection, creator)

    def _warm_failed(self, failure: Failure) -> Failure:
        """
        Log a failed warm dial as the bridge logs failed connections: a
        flood of them makes a few lines.
        """
        if not failure.check(CancelledError):
            error = failure.value
            kind = error.kind if isinstance(error, IngressError) else "other"
            where = f"{self.host}:{self.port} (a warm connection)"
            self.failures.failed(where, kind, failure.getErrorMessage())
        return failure

    def _handshake_timed(self, protocol: IngressProtocol) -> IngressProtocol:
        """
        Size the warm pool by how long C{protocol}'s TCP and TLS handshake
        took.
        """
        if protocol.handshake_seconds is not None:
            self.pool.handshake_took(protocol.handshake_seconds)
        return protocol

    def _released(self, result: T) -> T:
        self.queue.release()
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
        self,
        creator: IOpenSSLClientConnectionCreator,
        request: wire.ConnRequest | None,
        early: EarlyData | None = None,
    ) -> Deferred[IngressProtocol]:
        """
        A new connection, upgraded for C{request} (with C{early} behind
        it); without one, a warm connection, once its TLS handshake is done.
        """
        protocol = IngressProtocol(
            request,
            self.clock,
            self._connect_timeout,
            self._upgrade_timeout,
            self.host,
            early,
        )
        if request is not None:
            self.descriptors.release()  # the leg of an accepted connection
        failed = partial(self._dial_failed, protocol)
        address = self._address.address()
        if address is None:
            # The name's first lookup is not answered: an endpoint looks
            # it up for this dial.
            endpoint = HalfCloseableTLSClientEndpoint(
                creator, self._address.endpoint(self.port, self._connect_timeout)
            )
            connecting = endpoint.connect(_OneDial(None, protocol, failed))
            connecting.addErrback(failed)
            protocol.stop_connecting = connecting.cancel
        else:
            dial = _OneDial(self._tls_factory(creator), protocol, failed)
            connector = self._reactor.connectTCP(
                address, self.port, dial, timeout=self._connect_timeout
            )
            protocol.stop_connecting = connector.stopConnecting
        # Once TCP is up, the handshake (and the upgrade) decide.
        awaited = protocol.handshaken or protocol.upgraded
        return awaited.addCallback(self._handshake_timed)

    def _dial_failed(self, protocol: IngressProtocol, failure: Failure) -> None:
        """
        C{protocol}'s TCP connect failed: so does the dial, unless it was
        given up (then it failed with L{CancelledError}).
        """
        if protocol.stop_connecting is None:
            return
        protocol.stop_connecting = None
        awaited = protocol.handshaken or protocol.upgraded
        if failure.check(ConnectError, DNSLookupError):
            self._address.failed()
            reason = failure.getErrorMessage()
            awaited.errback(DialFailed(f"{self.host}:{self.port}: {reason}"))
        else:
            awaited.errback(failure)

    def _tls_factory(
        self, creator: IOpenSSLClientConnectionCreator
    ) -> HalfCloseableTLSFactory:
        """
        The TLS factory of C{creator}'s dials, kept while it is the newest.
        """
        if self._tls is None or self._tls[0] is not creator:
            self._tls = (creator, HalfCloseableTLSFactory(creator, True, Factory()))
        return self._tls[1]


class _OneDial(ClientFactory):
    """
    The factory of one dial to the ingress: it gives TCP the dial's TLS
    protocol, around its L{IngressProtocol}, and reports a failed connect.

    A dial by address goes straight to L{IReactorTCP.connectTCP} with it,
    with one TLS factory for every dial: an endpoint would add a factory
    and a protocol of its own to each, and a call in front of every read.
    For an endpoint (C{tls} is C{None}) it builds the L{IngressProtocol}.
    """

    noisy = False

    def __init__(
        self,
        tls: HalfCloseableTLSFactory | None,
        protocol: IngressProtocol,
        failed: Callable[[Failure], None],
    ) -> None:
        self._tls = tls
        self._protocol = protocol
        self._failed = failed

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        if self._tls is None:
            return self._protocol
        # What TLSMemoryBIOFactory.buildProtocol makes, around this protocol.
        return self._tls.protocol(self._tls, self._protocol)  # type: ignore[no-untyped-call]

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self._failed(reason)
