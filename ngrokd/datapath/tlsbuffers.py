# -*- test-case-name: ngrokd.test.test_tlsbuffers -*-
"""
Giving back what a TLS connection's handshake left in its memory buffers.

Twisted runs TLS over two OpenSSL memory BIOs per connection, one for the
bytes that come in and one for those that go out. A memory BIO grows to the
most it ever held and never shrinks: after the handshake, each connection
keeps room for its largest flight (the client's certificate chain going out,
the server's coming in), about 5 KiB per connection that is used again only
by bulk data. L{release_buffers} swaps them, once both are empty, for new
empty ones (OpenSSL frees the old ones): 5,000 connections open at once hold
25 MB less.

pyOpenSSL does not expose the swap: this uses its connection's private
C{_ssl}, C{_into_ssl} and C{_from_ssl}, as L{ngrokd.datapath.resumption}
uses C{_ssl}, and does nothing where they are not what it expects.
"""

from __future__ import annotations

from typing import Any

from OpenSSL._util import ffi, lib
from OpenSSL.SSL import Connection
from twisted.internet.interfaces import IReactorTime


def _empty(bio: Any) -> bool:
    data = ffi.new("char **")
    return bool(lib.BIO_get_mem_data(bio, data) == 0)


def release_buffers(connection: Connection) -> bool:
    """
    Give C{connection}'s memory BIOs new, empty ones, if both hold nothing
    (a byte still in either would be lost); whether it did.
    """
    ssl = getattr(connection, "_ssl", None)
    into = getattr(connection, "_into_ssl", None)
    out = getattr(connection, "_from_ssl", None)
    if ssl is None or into is None or out is None:
        return False  # not a connection over memory BIOs
    if not (_empty(into) and _empty(out)):
        return False
    fresh_in = lib.BIO_new(lib.BIO_s_mem())
    fresh_out = lib.BIO_new(lib.BIO_s_mem())
    if fresh_in == ffi.NULL or fresh_out == ffi.NULL:
        for bio in (fresh_in, fresh_out):
            if bio != ffi.NULL:
                lib.BIO_free(bio)
        return False
    lib.SSL_set_bio(ssl, fresh_in, fresh_out)  # frees the old ones
    connection._into_ssl = fresh_in
    connection._from_ssl = fresh_out
    return True


def release_buffers_soon(clock: IReactorTime, connection: Connection) -> None:
    """
    L{release_buffers} now or, when bytes are still in the buffers (the
    ingress's answer came with more behind it), once more on the reactor's
    next turn, once TLS has read them.
    """
    if not release_buffers(connection):
        clock.callLater(0, release_buffers, connection)
