# -*- test-case-name: ngrokd.test.test_ingress -*-
"""
TLS session resumption for the connections to the binding ingress.

A resumed handshake skips the certificate exchange and its signatures: it
costs both sides a fraction of the CPU of a full one. The ingress's
certificate is not checked again on resumption, because the session was made
by a handshake that checked it: so a session is offered only by the creator
that made it, which serves one ingress host with one client certificate and
one trust, and is replaced (with its session) when either changes. The
server's name is still checked on every handshake, resumed or not.
"""

from __future__ import annotations

from attrs import define
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL.SSL import Connection, Session
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer


@define
class HandshakeCounts:
    """
    Upgraded connections to the ingress by how their TLS handshake went:
    done ahead in the warm pool, resumed, or in full.
    """

    full: int = 0
    resumed: int = 0
    pooled: int = 0


def session_reused(connection: Connection) -> bool:
    """
    Whether C{connection}'s handshake resumed a session.

    pyOpenSSL does not wrap OpenSSL's C{SSL_session_reused}, so this calls it
    through cryptography's bindings with the connection's private C{SSL}
    pointer, the only way to tell a resumed handshake from a full one.
    """
    return bool(Binding.lib.SSL_session_reused(connection._ssl))


@implementer(IOpenSSLClientConnectionCreator)
class ResumingCreator:
    """
    Wraps a client creator so that each connection offers the session of the
    last one that completed; one session is kept, the newest.
    """

    def __init__(self, creator: IOpenSSLClientConnectionCreator) -> None:
        self._creator = creator
        self._session: Session | None = None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> Connection:
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        if self._session is not None:
            connection.set_session(self._session)
        return connection

    def completed(self, connection: Connection) -> bool:
        """
        Keep C{connection}'s session for the next connections; call it once
        the server has answered (a TLS 1.3 server sends its tickets after the
        handshake). Whether C{connection} resumed a session.
        """
        self._session = connection.get_session()
        return session_reused(connection)

    def failed(self) -> None:
        """
        A handshake failed: offer no session until one completes again.
        """
        self._session = None
