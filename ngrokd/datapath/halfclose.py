# -*- test-case-name: ngrokd.test.test_halfclose,ngrokd.test.test_twisted_seams -*-
"""
TLS with half-close.

Twisted's TLS transport closes the whole connection on the first
C{close_notify} and has no C{loseWriteConnection} (twisted issue 5341), so a
client that shuts down its sending side (C{shutdown(SHUT_WR)}) would lose the
reply it is still waiting for. Here C{loseWriteConnection} sends C{close_notify}
and keeps reading, and a peer's C{close_notify} becomes C{readConnectionLost}
for a protocol that provides L{IHalfCloseableProtocol}. When both directions
have closed, the TCP connection is closed.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: Every private member of L{TLSMemoryBIOProtocol} that
#: L{HalfCloseableTLSProtocol} overrides, reads or calls, and what for: Twisted
#: offers no public way in (twisted issue 5341).
#: L{ngrokd.test.test_twisted_seams} checks each against the installed Twisted.
TLS_INTERNALS = {
    "_checkHandshakeStatus": "overridden: runs as the handshake advances, so a"
    " close_notify asked for during the handshake goes out once it is done",
    "_unbufferPendingWrites": "overridden: runs when writes held during the"
    " handshake are encrypted, so a close_notify goes out after them",
    "_flushReceiveBIO": "overridden: reads the cleartext and meets the peer's"
    " close_notify, which becomes readConnectionLost",
    "_handshakeDone": "read: no close_notify before the handshake is done",
    "_appSendBuffer": "read: no close_notify while writes wait to be encrypted",
    "_lostTLSConnection": "read: nothing to send or read once TLS is gone",
    "_aborted": "read: no data for the protocol after abortConnection",
    "_tlsConnection": "read: the OpenSSL connection the cleartext comes from",
    "_shutdownTLS": "called: sends close_notify, and closes TCP when both sides"
    " have sent one",
    "_tlsShutdownFinished": "called: ends the connection after a TLS error or"
    " once both directions are closed",
    "_flushSendBIO": "called: sends what OpenSSL produced while reading",
}


class HalfCloseableTLSProtocol(TLSMemoryBIOProtocol):
    """
    A TLS transport that can close one direction at a time.

    It is built on L{TLSMemoryBIOProtocol}'s private members, each named in
    L{TLS_INTERNALS}; no other code in ngrokd touches them.
    """

    _writeClosed = False
    _closeNotifyPending = False
    _readClosed = False

    def loseWriteConnection(self) -> None:
        """
        Send C{close_notify} once everything written so far is out, and keep
        receiving. Writes after this are dropped.
        """
        if self._writeClosed or self.disconnecting or not self.connected:
            return
        self._writeClosed = True
        self._closeNotifyPending = True
        self._sendCloseNotifyIfReady()

    def write(self, data: bytes) -> None:
        if self._writeClosed:
            return
        super().write(data)

    def _sendCloseNotifyIfReady(self) -> None:
        if (
            self._closeNotifyPending
            and self._handshakeDone
            and not self._appSendBuffer
            and not self._lostTLSConnection
        ):
            self._closeNotifyPending = False
            # Completes the shutdown (and closes TCP) if the peer's
            # close_notify has already arrived.
            self._shutdownTLS()

    def _checkHandshakeStatus(self) -> None:
        super()._checkHandshakeStatus()
        self._sendCloseNotifyIfReady()

    def _unbufferPendingWrites(self) -> None:
        super()._unbufferPendingWrites()
        self._sendCloseNotifyIfReady()

    def _flushReceiveBIO(self) -> None:
        while not self._lostTLSConnection and not self._readClosed:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                self._peerClosedWrite()
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()

    def _peerClosedWrite(self) -> None:
        halfCloseable = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if halfCloseable is None or self._writeClosed or self.disconnecting:
            # Nobody to tell, or our side is done too: finish the shutdown.
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
            return
        self._readClosed = True
        halfCloseable.readConnectionLost()


class HalfCloseableTLSFactory(TLSMemoryBIOFactory):
    """
    L{TLSMemoryBIOFactory} building L{HalfCloseableTLSProtocol}s.
    """

    protocol = HalfCloseableTLSProtocol


@implementer(IStreamClientEndpoint)
class HalfCloseableTLSClientEndpoint:
    """
    Like L{twisted.internet.endpoints.wrapClientTLS}, with half-close.

    The connection Deferred fires when TCP connects; the handshake finishes
    after, and writes made before it are sent once it has.
    """

    def __init__(
        self, creator: IOpenSSLClientConnectionCreator, wrapped: IStreamClientEndpoint
    ) -> None:
        self._creator = creator
        self._wrapped = wrapped

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        factory = HalfCloseableTLSFactory(self._creator, True, protocolFactory)
        d: Deferred[Any] = self._wrapped.connect(factory)
        return d.addCallback(lambda tls: tls.wrappedProtocol)
