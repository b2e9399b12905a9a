# -*- test-case-name: ngrokd.test.test_descriptors,ngrokd.test.test_open_files -*-
"""
File descriptors set aside for the ingress legs of accepted connections.

Each carried connection holds two descriptors: the one accepted, and its leg
to the ingress, opened after the accept (at once, or when its turn to dial
comes). Were an accept to take the last free descriptor, the leg would fail
(C{EMFILE}) although the connection was accepted. So a listener accepts only
once L{DescriptorReserve} holds a spare descriptor for each connection
waiting for its leg, one for the connection about to be accepted, and
L{SPARE} more for what else the daemon opens meanwhile; a dial gives one
back just before it opens its socket. Otherwise the connection waits in the
kernel's backlog, and is accepted once descriptors are free.

The spares are sockets never connected: each is made and closed by one
system call, no I/O.
"""

from __future__ import annotations

import socket

#: Descriptors kept beyond those owed to accepted connections.
SPARE = 8


class DescriptorReserve:
    """
    Spare descriptors, held until a dial needs one.
    """

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    @property
    def held(self) -> int:
        return len(self._held)

    def hold(self, count: int) -> None:
        """
        Hold C{count} spares: close those beyond it, make those missing.

        @raise OSError: too few descriptors are free (C{EMFILE} or
            C{ENFILE}); the spares made until then stay held.
        """
        while len(self._held) > count:
            self._held.pop().close()
        while len(self._held) < count:
            self._held.append(socket.socket())

    def release(self) -> None:
        """
        A leg is about to open its socket: free a spare for it, if one is
        held.
        """
        if self._held:
            self._held.pop().close()

    def close(self) -> None:
        """
        Hold nothing any more.
        """
        self.hold(0)
