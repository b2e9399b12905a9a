# -*- test-case-name: ngrokd.test.test_control -*-
"""
One control connection: its first byte picks the protocol (a C{{} the
original's JSON, L{LegacyJSON}; anything else AMP, L{ControlAMP}), and the
limits that keep whoever may open the socket from taking the daemon's
memory or its file descriptors.

An AMP box is capped (L{MAX_BOX_BYTES}), a connection is read no further
while its answers are unsent or unfinished (L{MAX_PENDING_ANSWERS}), at
most L{MAX_CONNECTIONS} are served with L{RESERVED_CONNECTIONS} more for
root and the daemon's user, a connection turned away is told "too many
connections", and one silent for L{IDLE_TIMEOUT} is closed. Each closed
for a reason is told to a L{Closing}, which the service logs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

from ngrokd.control.commands import TOO_MANY_CONNECTIONS
from ngrokd.control.controller import Controller
from ngrokd.control.legacy import LegacyJSON
from ngrokd.control.peer import Peer, privileged
from ngrokd.control.responders import ControlCommands

#: How long a control connection may stay silent, in seconds (ngrokctl's
#: longest wait between two calls is its events wait, under a minute).
IDLE_TIMEOUT = 120.0
#: How many control connections are served at once.
MAX_CONNECTIONS = 64
#: How many more are kept for root and the daemon's own user, so that a
#: member of the socket's group holding L{MAX_CONNECTIONS} cannot lock
#: them out.
RESERVED_CONNECTIONS = 8
#: How many connections turned away may wait at once for their first
#: request, to be told why; beyond these, one is closed at once.
MAX_TURNED_AWAY = 16
#: How long a connection turned away may take to send its first request.
TURN_AWAY_TIMEOUT = 5.0
#: The most bytes one AMP box may hold: a request of this protocol is one
#: value of at most 64 KiB and a few short keys.
MAX_BOX_BYTES = 72 * 1024
#: The most keys one AMP box may hold (no command here has more than four).
MAX_BOX_KEYS = 32
#: How many requests of one connection may wait for their answer at once
#: (C{ngrokctl} sends one at a time); beyond these, and while the answers
#: sent are not read, the connection is read no further.
MAX_PENDING_ANSWERS = 8


#: Called with the kind of a closed connection and why it was closed.
Closing = Callable[[str, str], None]


class ControlAMP(amp.AMP):
    """
    The AMP side of a control connection.

    It is its transport's producer: while more than the transport's buffer
    of answers is unsent, or L{MAX_PENDING_ANSWERS} requests wait for
    theirs, it parses no further request and the transport reads no
    further. A box over L{MAX_BOX_BYTES} or L{MAX_BOX_KEYS} closes the
    connection.

    @param turned_away: when not empty, this connection is not served: its
        first request is answered with this (L{TOO_MANY_CONNECTIONS}), then
        it is closed.
    """

    def __init__(
        self,
        controller: Controller,
        peer: Peer | None,
        closing: Closing,
        turned_away: str = "",
    ) -> None:
        amp.AMP.__init__(self, locator=ControlCommands(controller, peer))
        self._closing = closing
        self._turned_away = turned_away
        self._box_bytes = 0
        self._box_strings = 0
        self._pending = 0
        #: The transport holds more answers than its buffer.
        self.answers_unread = False
        self._receiving = False
        self._closed = False

    def makeConnection(self, transport: Any) -> None:
        # Not AMP's own, which logs every connection: ngrokctl makes one
        # per command, and health checks one every few seconds.
        amp.BinaryBoxProtocol.makeConnection(self, transport)
        transport.registerProducer(self, True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        amp.BinaryBoxProtocol.connectionLost(self, reason)

    def dataReceived(self, data: bytes) -> None:
        self._receiving = True
        try:
            amp.AMP.dataReceived(self, data)
        except (amp.AmpError, KeyError) as e:
            # An empty box, or an answer to nothing asked: not a client.
            what = type(e).__name__
            self._close("malformed", f"sent what is not an AMP request ({what})")
        finally:
            self._receiving = False

    def stringReceived(self, string: bytes) -> None:
        if self._closed:
            return
        self._box_bytes += len(string) + 2
        self._box_strings += 1
        if self._box_bytes > MAX_BOX_BYTES or self._box_strings > 2 * MAX_BOX_KEYS:
            self._close(
                "oversized",
                f"sent a request over {MAX_BOX_BYTES} bytes or {MAX_BOX_KEYS} keys",
            )
            return
        if not string and self.state in ("init", "key"):  # the box ends
            self._box_bytes = self._box_strings = 0
        amp.AMP.stringReceived(self, string)

    def _close(self, kind: str, reason: str) -> None:
        self._closed = True
        self._hold()
        self._closing(kind, reason)
        _abort(self.transport)

    def dispatchCommand(self, box: amp.AmpBox) -> Deferred[Any]:
        if self._turned_away:
            self._closed = True  # the error box closes the connection
            self._hold()
            return fail(
                amp.RemoteAmpError(TOO_MANY_CONNECTIONS, self._turned_away, fatal=True)
            )
        answering: Deferred[Any] = amp.AMP.dispatchCommand(self, box)
        if not answering.called:
            self._pending += 1
            self._hold()
            answering.addBoth(self._answered)
        return answering

    def _answered(self, result: object) -> object:
        self._pending -= 1
        self._hold()
        return result

    def pauseProducing(self) -> None:
        # The transport: more answers unsent than its buffer.
        self.answers_unread = True
        self._hold()

    def resumeProducing(self) -> None:
        self.answers_unread = False
        self._hold()

    def stopProducing(self) -> None:
        self._closed = True
        self.paused = True

    def _hold(self) -> None:
        """
        Read and parse requests only while their answers are being read
        and few wait to be made.
        """
        hold = (
            self._closed or self.answers_unread or self._pending >= MAX_PENDING_ANSWERS
        )
        if hold == self.paused:
            return
        self.paused = hold
        transport: Any = self.transport
        if hold:
            transport.pauseProducing()
            return
        transport.resumeProducing()
        if not self._receiving:  # parse what was read before the pause
            self.dataReceived(b"")


def admitted(serving: int, peer: Peer | None, daemon_uid: int) -> bool:
    """
    Whether a new connection from C{peer} is served while C{serving} are:
    up to L{MAX_CONNECTIONS}, and L{RESERVED_CONNECTIONS} more for root
    and the daemon's user.
    """
    reserve = RESERVED_CONNECTIONS if privileged(peer, daemon_uid) else 0
    return serving < MAX_CONNECTIONS + reserve


#: What a connection turned away is told.
TURNED_AWAY = (
    f"too many connections: ngrokd serves {MAX_CONNECTIONS} control"
    f" connections at once ({RESERVED_CONNECTIONS} more for root and its own"
    " user); try again when one closes"
)


class ControlFactory(Factory):
    """
    Makes control connections: see L{admitted} for how many are served.
    Each is closed after L{IDLE_TIMEOUT} seconds without a byte from its
    peer.
    """

    noisy = False

    def __init__(
        self,
        controller: Controller,
        credentials: Callable[[Any], Peer],
        clock: IReactorTime,
        closing: Closing,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.controller = controller
        self.credentials = credentials
        self.clock = clock
        self.closing = closing
        self.idle_timeout = idle_timeout
        #: Connections served.
        self.open = 0
        #: Connections waiting to be told they are not served.
        self.turned_away = 0

    def buildProtocol(self, addr: object) -> Protocol:
        return ControlProtocol(self)


class ControlProtocol(Protocol):
    """
    Picks the protocol from the first byte, then hands everything to it.
    A connection beyond the limit is handed to one that only says so.
    """

    def __init__(self, factory: ControlFactory) -> None:
        self._factory = factory
        self._controller = factory.controller
        self._credentials = factory.credentials
        self._delegate: ControlAMP | LegacyJSON | None = None
        self._idle: IDelayedCall | None = None
        self._peer: Peer | None = None
        #: Which count of the factory holds this connection.
        self._counted = ""
        self._turned_away = ""

    def connectionMade(self) -> None:
        factory = self._factory
        self._peer = self._peer_of()
        timeout = factory.idle_timeout
        if admitted(factory.open, self._peer, self._controller.daemon_uid):
            factory.open += 1
            self._counted = "open"
        else:
            factory.closing("busy", f"was turned away: {TURNED_AWAY}")
            assert self.transport is not None
            if factory.turned_away >= MAX_TURNED_AWAY:
                _abort(self.transport)
                return
            factory.turned_away += 1
            self._counted = "turned_away"
            self._turned_away = TURNED_AWAY
            timeout = TURN_AWAY_TIMEOUT
        self._idle = factory.clock.callLater(timeout, self._timed_out, timeout)

    def _timed_out(self, timeout: float) -> None:
        if not self._turned_away:
            if self._delegate is not None and self._delegate.answers_unread:
                reason = f"read none of its answers for {timeout:g}s"
            else:
                reason = f"sent nothing for {timeout:g}s"
            self._factory.closing("idle", reason)
        _abort(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None and self._idle.active() and not self._turned_away:
            self._idle.reset(self._factory.idle_timeout)
        if self._delegate is None:
            delegate: ControlAMP | LegacyJSON
            if data[:1] == b"{":
                delegate = LegacyJSON(self._controller, self._peer, self._turned_away)
            else:
                delegate = ControlAMP(
                    self._controller,
                    self._peer,
                    self._factory.closing,
                    self._turned_away,
                )
            delegate.makeConnection(self.transport)
            self._delegate = delegate
        self._delegate.dataReceived(data)

    def _peer_of(self) -> Peer | None:
        try:
            return self._credentials(self.transport)
        except (OSError, AttributeError):
            return None  # not a UNIX socket: changes are refused

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._counted == "open":
            self._factory.open -= 1
        elif self._counted == "turned_away":
            self._factory.turned_away -= 1
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self._delegate is not None:
            self._delegate.connectionLost(reason)


def _abort(transport: Any) -> None:
    """
    Close C{transport} now, dropping what it has not sent.
    """
    transport.abortConnection()
