# -*- test-case-name: ngrokd.test.test_halfclose,ngrokd.test.test_twisted_seams -*-
"""
TLS with half-close, in big chunks.

Twisted's TLS transport closes the whole connection on the first
C{close_notify} and has no C{loseWriteConnection} (twisted issue 5341), so a
client that shuts down its sending side (C{shutdown(SHUT_WR)}) would lose the
reply it is still waiting for. Here C{loseWriteConnection} sends C{close_notify}
and keeps reading, and a peer's C{close_notify} becomes C{readConnectionLost}
for a protocol that provides L{IHalfCloseableProtocol}. When both directions
have closed, the TCP connection is closed.

Twisted's TLS transport works a record (16 KiB) at a time: it copies each
16 KiB of a write out before encrypting it, writes each record to TCP on its
own, and hands each record received to the protocol on its own. That Python
work per record is most of what moving bulk data costs. Here a write is
encrypted in place by one call to OpenSSL, whatever its size (pyOpenSSL
asks OpenSSL for a record per call), and all its records go to TCP as one
write; the records one TCP read brings are decrypted into one buffer
straight from OpenSSL (pyOpenSSL copies each record twice, with a Python
call around each) and handed to the protocol as one piece (of at most
L{DELIVER_SIZE} bytes).
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL.SSL import Connection, Error, WantReadError, ZeroReturnError
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

from ngrokd.datapath.sendnow import send_now

#: The most cleartext handed to the protocol in one C{dataReceived}: what
#: one read of a spliced connection brings
#: (L{ngrokd.datapath.splice.READ_SIZE}), less what TLS adds.
DELIVER_SIZE = 256 * 1024
#: The most OpenSSL output sent in one TCP write: a write of DELIVER_SIZE
#: cleartext, with what TLS adds to its records, in one.
SEND_SIZE = 2 * DELIVER_SIZE

_lib, _ffi = Binding.lib, Binding.ffi
#: Where records are decrypted, for every connection: the reactor's thread
#: alone uses it, and what it holds is copied out before the protocol
#: gets it.
_cleartext = bytearray(DELIVER_SIZE)
_cleartext_view = memoryview(_cleartext)
_cleartext_at = _ffi.from_buffer(_cleartext)
#: Where OpenSSL's output is read to be sent, likewise: what the socket does
#: not take at once is copied out (L{send_now}).
_ciphertext = bytearray(SEND_SIZE)
_ciphertext_view = memoryview(_ciphertext)
_ciphertext_at = _ffi.from_buffer(_ciphertext)

#: Every private member of pyOpenSSL's C{Connection} that
#: L{HalfCloseableTLSProtocol} uses, and what for: pyOpenSSL offers no way
#: to decrypt into a buffer of one's own, nor to ask for whole writes.
PYOPENSSL_INTERNALS = {
    "_ssl": "read: the SSL pointer that records are decrypted from and whose"
    " partial writes are turned off, through cryptography's bindings",
    "_raise_ssl_error": "called: turns a failed SSL_read into pyOpenSSL's"
    " exception, as its own recv does",
    "_from_ssl": "read: the memory BIO that OpenSSL's output is read from"
    " into a buffer of ngrokd's",
}

#: Every private member of L{TLSMemoryBIOProtocol} that
#: L{HalfCloseableTLSProtocol} overrides, reads or calls, and what for: Twisted
#: offers no public way in (twisted issue 5341), nor a way to choose how much
#: it encrypts, sends or delivers at once.
#: L{ngrokd.test.test_twisted_seams} checks each against the installed Twisted.
TLS_INTERNALS = {
    "_checkHandshakeStatus": "overridden: runs as the handshake advances, so a"
    " close_notify asked for during the handshake goes out once it is done",
    "_unbufferPendingWrites": "overridden: runs when writes held during the"
    " handshake are encrypted, so a close_notify goes out after them",
    "_flushReceiveBIO": "overridden: reads the cleartext, hands it on in big"
    " pieces and meets the peer's close_notify, which becomes"
    " readConnectionLost",
    "_write": "overridden: encrypts what the protocol writes without copying"
    " it in 16 KiB slices, and sends the records in one TCP write (Twisted's"
    " makes one per record)",
    "_flushSendBIO": "overridden: sends all OpenSSL produced in one TCP write"
    " (Twisted's reads 32 KiB of it, and copies it); called: after reading",
    "_bufferedWrite": "called: holds a write OpenSSL cannot take yet",
    "_handshakeDone": "read: no close_notify before the handshake is done",
    "_appSendBuffer": "read: no close_notify while writes wait to be encrypted",
    "_lostTLSConnection": "read: nothing to send or read once TLS is gone",
    "_aborted": "read: no data for the protocol after abortConnection",
    "_tlsConnection": "read: the OpenSSL connection the cleartext comes from",
    "_shutdownTLS": "called: sends close_notify, and closes TCP when both sides"
    " have sent one",
    "_tlsShutdownFinished": "called: ends the connection after a TLS error or"
    " once both directions are closed",
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
    _wholeWrites = False

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

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        if not self._wholeWrites:
            # pyOpenSSL asks OpenSSL for partial writes: a record per call.
            self._wholeWrites = True
            _lib.SSL_clear_mode(
                self._tlsConnection._ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE
            )
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                sent += self._tlsConnection.send(view[sent:])
            except WantReadError:
                # Not until the handshake is done: keep the rest, as Twisted
                # does.
                self._bufferedWrite(bytes(view[sent:]))
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                return
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        """
        Send what OpenSSL produced, straight from one buffer: in one TCP
        write, unless it is more than the buffer holds.
        """
        wbio = self._tlsConnection._from_ssl
        while (size := _lib.BIO_read(wbio, _ciphertext_at, SEND_SIZE)) > 0:
            send_now(self.transport, (_ciphertext_view[:size],))
            if size < SEND_SIZE:
                break

    def _flushReceiveBIO(self) -> None:
        connection: Connection = self._tlsConnection
        ssl = connection._ssl
        size = 0
        while not self._lostTLSConnection and not self._readClosed:
            read = _lib.SSL_read(ssl, _cleartext_at + size, DELIVER_SIZE - size)
            if read > 0:
                size += read
                if size == DELIVER_SIZE:
                    self._deliver(size)
                    size = 0
                continue
            try:
                connection._raise_ssl_error(ssl, read)
            except WantReadError:
                pass
            except ZeroReturnError:
                self._deliver(size)
                size = 0
                self._peerClosedWrite()
                continue
            except Error:
                self._deliver(size)
                size = 0
                self._tlsShutdownFinished(Failure())
                continue
            break
        self._deliver(size)
        self._flushSendBIO()

    def _deliver(self, size: int) -> None:
        """
        Hand the first C{size} bytes of cleartext to the protocol as one
        piece: as a view of the buffer to one that takes views
        (L{ngrokd.datapath.splice.PipeProtocol.viewReceived}), which copies
        what it keeps, else as bytes.
        """
        if size and not self._aborted:
            piece = _cleartext_view[:size]
            take_view = getattr(self.wrappedProtocol, "viewReceived", None)
            if take_view is not None:
                take_view(piece)
            else:
                ProtocolWrapper.dataReceived(self, bytes(piece))

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
