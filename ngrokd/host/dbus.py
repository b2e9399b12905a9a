# -*- test-case-name: ngrokd.test.test_dbus -*-
"""
A small D-Bus client connection on the reactor, for talking to
systemd-resolved without a thread and without blocking.

The wire format is jeepney's: its message builder and parser, which do no
I/O of their own, are driven here by a Twisted protocol on the bus's UNIX
socket (SASL C{EXTERNAL} authentication, C{Hello}, then messages). jeepney
is maintained and small; txdbus, the Twisted-native alternative, has had no
release since 2020.

Everything a bus (or whatever listens on its socket) can make us hold is
bounded: a message over L{MAX_MESSAGE} bytes, bytes that are not D-Bus, or
an authentication that does not end with C{OK} close the connection with
the reason; at most L{MAX_CALLS} calls wait for their reply, and each waits
at most its timeout. Replies are matched to calls by serial; a reply that
comes after its call timed out is dropped.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, cast

from jeepney import (
    DBusAddress,
    HeaderFields,
    MessageFlag,
    MessageType,
    new_error,
    new_method_call,
)
from jeepney.auth import BEGIN, AuthenticationError, Authenticator
from jeepney.bus_messages import MatchRule, message_bus
from jeepney.low_level import Message, calc_msg_size
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IReactorUNIX,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

#: Where the system bus listens (the D-Bus specification's default).
SYSTEM_BUS = "/run/dbus/system_bus_socket"
#: The largest message accepted: resolved's answers are a few KiB at most.
MAX_MESSAGE = 1 << 20
#: How many calls may wait for their reply at once.
MAX_CALLS = 32
#: How long a call waits for its reply, by default.
CALL_TIMEOUT = 10.0
#: How long connecting, authenticating and C{Hello} may take together.
CONNECT_TIMEOUT = 10.0

#: The bus itself, for C{Hello}, C{AddMatch}, C{NameHasOwner}.
BUS = message_bus
PROPERTIES = "org.freedesktop.DBus.Properties"
_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"


class DBusError(Exception):
    """
    A D-Bus call did not get its answer.
    """


class ErrorReply(DBusError):
    """
    The other side answered a call with a D-Bus error: C{name} is its error
    name (C{org.freedesktop.DBus.Error.AccessDenied}), C{text} its message.
    """

    def __init__(self, member: str, name: str, text: str) -> None:
        super().__init__(member, name, text)
        self.member = member
        self.name = name
        self.text = text

    def __str__(self) -> str:
        return f"{self.member}: {self.name}" + (f": {self.text}" if self.text else "")


class CallTimedOut(DBusError):
    """
    No reply came within the call's timeout.
    """


class TooManyCalls(DBusError):
    """
    L{MAX_CALLS} calls already wait for their replies.
    """


class Disconnected(DBusError):
    """
    The connection to the bus is closed or was never opened; the text says
    why.
    """


def method_call(
    address: DBusAddress,
    member: str,
    signature: str | None = None,
    body: tuple[Any, ...] = (),
) -> Any:
    """
    A method call message that never starts a service that is not running
    (no bus activation: asking resolved must not start it).
    """
    message = new_method_call(address, member, signature, body)
    message.header.flags |= MessageFlag.no_auto_start
    return message


def property_get(address: DBusAddress, name: str) -> Any:
    """
    The call that reads property C{name} of C{address}'s interface.
    """
    properties = DBusAddress(address.object_path, address.bus_name, PROPERTIES)
    return method_call(properties, "Get", "ss", (address.interface, name))


class DBusConnection(Protocol):
    """
    One client connection to a message bus.

    Made by L{connect}, which hands it over once the bus has accepted it
    (authenticated, C{Hello} answered). L{call} sends a method call and
    gives its reply's body; L{subscribe} asks the bus for the signals a
    match rule selects and passes each to a callback.

    @ivar unique_name: the name the bus gave this connection.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        max_message: int = MAX_MESSAGE,
        max_calls: int = MAX_CALLS,
    ) -> None:
        self._clock = clock
        self._max_message = max_message
        self._max_calls = max_calls
        self._auth: Authenticator | None = Authenticator()
        self._buffer = bytearray()
        self._serial = 0
        self._calls: dict[int, tuple[str, Deferred[tuple[Any, ...]], IDelayedCall]] = {}
        self._signals: list[tuple[Any, Callable[[tuple[Any, ...]], None]]] = []
        self._ready: Deferred[DBusConnection] | None = Deferred()
        self._lost: list[Deferred[str]] = []
        #: Why the connection is closing or closed, once it is.
        self._closed: str | None = None
        self._gone = False
        self.unique_name = ""

    # Twisted's side.

    def connectionMade(self) -> None:
        assert self._auth is not None
        self._send(self._auth.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        if self._auth is not None:
            self._authenticate(data)
            return
        self._buffer += data
        self._frames()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        why = (
            self._closed or f"the bus closed the connection: {reason.getErrorMessage()}"
        )
        self._closed = why
        self._gone = True
        calls, self._calls = self._calls, {}
        for _, d, timer in calls.values():
            timer.cancel()
            d.errback(Disconnected(why))
        if self._ready is not None:
            ready, self._ready = self._ready, None
            ready.errback(Disconnected(why))
        lost, self._lost = self._lost, []
        for waiter in lost:
            waiter.callback(why)

    # The connection's users.

    def when_ready(self) -> Deferred[DBusConnection]:
        """
        Fires with this connection once the bus has said C{Hello}, or fails
        with L{Disconnected}. Only for L{connect}.
        """
        assert self._ready is not None
        return self._ready

    def call(
        self, message: Any, timeout: float = CALL_TIMEOUT
    ) -> Deferred[tuple[Any, ...]]:
        """
        Send the method call C{message} and fire with its reply's body.

        @return: a Deferred that fails with L{ErrorReply} (the other side
            said no), L{CallTimedOut}, L{TooManyCalls} or L{Disconnected}.
        """
        member = message.header.fields.get(HeaderFields.member, "?")
        if self._closed is not None:
            return fail(Disconnected(self._closed))
        if len(self._calls) >= self._max_calls:
            return fail(
                TooManyCalls(
                    f"{member}: {self._max_calls} D-Bus calls already wait for replies"
                )
            )
        serial = self._next_serial()
        d: Deferred[tuple[Any, ...]] = Deferred()
        timer = self._clock.callLater(timeout, self._timed_out, serial, timeout)
        self._calls[serial] = (member, d, timer)
        self._send(message.serialise(serial=serial))
        return d

    def subscribe(
        self, rule: Any, callback: Callable[[tuple[Any, ...]], None]
    ) -> Deferred[None]:
        """
        Ask the bus for the signals C{rule} (a jeepney C{MatchRule}) selects
        and call C{callback} with each one's body, from now on.
        """
        self._signals.append((rule, callback))
        d = self.call(BUS.AddMatch(rule))

        def failed(failure: Failure) -> Failure:
            self._signals.remove((rule, callback))
            return failure

        return d.addCallbacks(lambda _: None, failed)

    def when_lost(self) -> Deferred[str]:
        """
        Fires with the reason once the connection is closed.
        """
        if self._gone:
            assert self._closed is not None
            return succeed(self._closed)
        d: Deferred[str] = Deferred()
        self._lost.append(d)
        return d

    def close(self) -> Deferred[str]:
        """
        Close the connection; pending calls fail with L{Disconnected}.
        """
        d = self.when_lost()
        if self._closed is None:
            self._closed = "the connection was closed"
            self._transport().loseConnection()
        return d

    # Below: the protocol.

    def _transport(self) -> ITCPTransport:
        # UNIX connections have abortConnection too.
        assert self.transport is not None
        return cast(ITCPTransport, self.transport)

    def _send(self, data: bytes) -> None:
        self._transport().write(data)

    def _next_serial(self) -> int:
        # Serials are 32-bit and never 0.
        self._serial = self._serial % 0xFFFFFFFF + 1
        return self._serial

    def _abort(self, why: str) -> None:
        if self._closed is None:
            self.log.warn("D-Bus connection dropped: {why}", why=why)
            self._closed = why
        self._transport().abortConnection()

    def _authenticate(self, data: bytes) -> None:
        assert self._auth is not None
        try:
            self._auth.feed(data)
        except AuthenticationError as e:
            self._abort(f"the bus refused authentication: {e}")
            return
        if not self._auth.authenticated:
            return
        self._send(BEGIN)
        self._auth = None
        self.call(BUS.Hello()).addCallbacks(self._hello, self._not_hello)

    def _hello(self, body: tuple[Any, ...]) -> None:
        self.unique_name = str(body[0])
        if self._ready is not None:
            ready, self._ready = self._ready, None
            ready.callback(self)

    def _not_hello(self, failure: Failure) -> None:
        if self._ready is not None and failure.check(ErrorReply, CallTimedOut):
            self._abort(f"the bus did not accept Hello: {failure.value}")

    def _timed_out(self, serial: int, timeout: float) -> None:
        member, d, _ = self._calls.pop(serial)
        d.errback(CallTimedOut(f"{member}: no reply within {timeout:g} s"))

    def _frames(self) -> None:
        buffer = self._buffer
        while len(buffer) >= 16 and self._closed is None:
            if buffer[0] not in b"lB":
                self._abort("the bus sent bytes that are not a D-Bus message")
                return
            size = calc_msg_size(bytes(buffer[:16]))
            if size > self._max_message:
                self._abort(
                    f"the bus sent a message of {size} bytes,"
                    f" over the limit of {self._max_message}"
                )
                return
            if len(buffer) < size:
                return
            raw = bytes(buffer[:size])
            del buffer[:size]
            try:
                message = Message.from_buffer(raw)
            except (ValueError, KeyError, IndexError, struct.error) as e:
                self._abort(f"the bus sent a message that cannot be parsed: {e!r}")
                return
            self._dispatch(message)

    def _dispatch(self, message: Any) -> None:
        kind = message.header.message_type
        fields = message.header.fields
        if kind in (MessageType.method_return, MessageType.error):
            waiting = self._calls.pop(fields.get(HeaderFields.reply_serial, 0), None)
            if waiting is None:
                return
            member, d, timer = waiting
            timer.cancel()
            if kind is MessageType.method_return:
                d.callback(message.body)
            else:
                text = (
                    message.body[0]
                    if message.body and isinstance(message.body[0], str)
                    else ""
                )
                d.errback(
                    ErrorReply(member, fields.get(HeaderFields.error_name, "?"), text)
                )
        elif kind is MessageType.signal:
            for rule, callback in list(self._signals):
                if rule.matches(message):
                    try:
                        callback(message.body)
                    except Exception:
                        self.log.failure("a D-Bus signal's handler failed")
        elif not message.header.flags & MessageFlag.no_reply_expected:
            # Nothing is offered on this connection: say so, as a peer must.
            self._send(
                new_error(
                    message, _UNKNOWN_METHOD, "s", ("ngrokd offers no methods",)
                ).serialise(serial=self._next_serial())
            )


def name_owner_changed(name: str) -> Any:
    """
    The match rule for the bus's C{NameOwnerChanged} signal about C{name}.
    """
    rule = MatchRule(
        type="signal",
        sender=BUS.bus_name,
        interface=BUS.interface,
        member="NameOwnerChanged",
        path=BUS.object_path,
    )
    rule.add_arg_condition(0, name)
    return rule


def connect(
    reactor: IReactorUNIX,
    path: str = SYSTEM_BUS,
    timeout: float = CONNECT_TIMEOUT,
    **options: Any,
) -> Deferred[DBusConnection]:
    """
    Connect to the bus listening on C{path}, authenticate as this process's
    user, and say C{Hello}: connecting and the rest each within C{timeout} seconds.

    @param options: passed to L{DBusConnection} (its bounds).
    @return: a Deferred that fails with L{Disconnected} naming C{path} when
        the bus cannot be reached or does not accept the connection.
    """
    clock = IReactorTime(reactor)
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
    connection = DBusConnection(clock, **options)

    def connected(_: object) -> Deferred[DBusConnection]:
        ready = connection.when_ready()
        timer = clock.callLater(
            timeout, connection._abort, f"no answer to Hello within {timeout:g} s"
        )

        def done(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return ready.addBoth(done)

    def failed(failure: Failure) -> Failure:
        reason = failure.value
        if not isinstance(reason, Disconnected):
            reason = Disconnected(f"{reason}")
        return Failure(Disconnected(f"D-Bus at {path}: {reason}"))

    d: Deferred[DBusConnection] = connectProtocol(endpoint, connection)
    return d.addCallback(connected).addErrback(failed)
