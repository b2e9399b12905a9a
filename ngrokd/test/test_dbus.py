"""
Tests for L{ngrokd.host.dbus}: calls, replies, errors, signals, timeouts
and bounds against a real C{dbus-daemon} the test starts, and the framing's
edge cases on a string transport.
"""

from __future__ import annotations

import os
import sys
from typing import cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorUNIX
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

if not sys.platform.startswith("linux"):
    raise SkipTest("the D-Bus client is used on Linux only")

from jeepney import DBusAddress, HeaderFields, MessageType, new_method_return
from jeepney.low_level import Message

from ngrokd.host.dbus import (
    BUS,
    CallTimedOut,
    DBusConnection,
    Disconnected,
    ErrorReply,
    TooManyCalls,
    connect,
    method_call,
    name_owner_changed,
)
from ngrokd.test.dbusdaemon import Peer, start_bus

reactor = cast(IReactorUNIX, _reactor)
PEER = "org.ngrokd.Test1"
OBJECT = DBusAddress("/org/ngrokd/Test", PEER, "org.ngrokd.Test")


def call(member: str, signature: str | None = None, body: tuple = ()) -> object:
    return method_call(OBJECT, member, signature, body)


class RealBusTests(TestCase):
    """
    A connection to a real C{dbus-daemon}, and a real peer on it.
    """

    timeout = 60

    async def connected(self, **options) -> DBusConnection:
        connection = await connect(reactor, self.path, **options)
        self.addCleanup(connection.close)
        return connection

    def setUp(self) -> None:
        self.bus = start_bus(self)
        self.path = self.bus.path

    async def test_hello(self) -> None:
        """
        The bus accepts the connection and gives it a unique name; the bus's
        own methods answer (NameHasOwner about that name).
        """
        connection = await self.connected()
        self.assertTrue(connection.unique_name.startswith(":"))
        self.assertEqual(
            await connection.call(BUS.NameHasOwner(connection.unique_name)), (True,)
        )
        self.assertEqual(await connection.call(BUS.NameHasOwner(PEER)), (False,))

    async def test_reply(self) -> None:
        """
        A call fires with its reply's body; concurrent calls each get their
        own reply.
        """
        Peer(self, self.path, PEER)
        connection = await self.connected()
        first = connection.call(call("Echo", "s", ("one",)))
        second = connection.call(call("Echo", "sy", ("two", 2)))
        self.assertEqual(await second, ("two", 2))
        self.assertEqual(await first, ("one",))

    async def test_errorReply(self) -> None:
        """
        An error answer fails the call with the D-Bus error name and text,
        both in its message.
        """
        Peer(self, self.path, PEER)
        connection = await self.connected()
        with self.assertRaises(ErrorReply) as caught:
            await connection.call(call("Fail"))
        self.assertEqual(caught.exception.name, "org.ngrokd.Test.Error.Refused")
        self.assertEqual(
            str(caught.exception), "Fail: org.ngrokd.Test.Error.Refused: no, never"
        )

    async def test_noSuchService(self) -> None:
        """
        A call to a name nobody owns fails with the bus's NameHasNoOwner:
        the call asks the bus not to start a service for it (no activation).
        """
        connection = await self.connected()
        with self.assertRaises(ErrorReply) as caught:
            await connection.call(call("Echo"))
        self.assertEqual(
            caught.exception.name, "org.freedesktop.DBus.Error.NameHasNoOwner"
        )

    async def test_timeout(self) -> None:
        """
        A call without a reply within its timeout fails with CallTimedOut;
        the late reply is dropped and the connection keeps working.
        """
        Peer(self, self.path, PEER)
        connection = await self.connected()
        with self.assertRaises(CallTimedOut) as caught:
            await connection.call(call("Slow"), timeout=0.1)
        self.assertIn("Slow: no reply within 0.1 s", str(caught.exception))
        self.assertEqual(await connection.call(call("Slow")), ("late",))
        self.assertEqual(await connection.call(call("Echo", "u", (7,))), (7,))

    async def test_callsInFlightBounded(self) -> None:
        """
        Past max_calls waiting calls, another fails at once; once replies
        came, calls are accepted again.
        """
        Peer(self, self.path, PEER)
        connection = await self.connected(max_calls=2)
        waiting = [connection.call(call("Slow")) for _ in range(2)]
        with self.assertRaises(TooManyCalls):
            await connection.call(call("Echo"))
        self.assertEqual([await d for d in waiting], [("late",), ("late",)])
        self.assertEqual(await connection.call(call("Echo", "u", (1,))), (1,))

    async def test_messageSizeBounded(self) -> None:
        """
        A message over max_message bytes closes the connection: the call
        fails with Disconnected saying so, and so does any later call.
        """
        Peer(self, self.path, PEER)
        connection = await self.connected(max_message=4096)
        self.assertEqual(
            len((await connection.call(call("Big", "u", (1000,))))[0]), 1000
        )
        with self.assertRaises(Disconnected) as caught:
            await connection.call(call("Big", "u", (10000,)))
        self.assertIn("over the limit of 4096", str(caught.exception))
        self.assertIn("over the limit", await connection.when_lost())
        self.flushLoggedErrors()
        with self.assertRaises(Disconnected):
            await connection.call(call("Echo"))

    async def test_signals(self) -> None:
        """
        subscribe() passes the signals its rule selects, here the bus's
        NameOwnerChanged for one name as a peer comes and goes, and no
        others.
        """
        connection = await self.connected()
        seen: list[tuple] = []
        changed: Deferred[None] = Deferred()

        def owner_changed(body: tuple) -> None:
            seen.append(body)
            if len(seen) == 2:
                changed.callback(None)

        await connection.subscribe(name_owner_changed(PEER), owner_changed)
        peer = Peer(self, self.path, PEER)
        await connection.call(call("Emit", "s", ("ignored",)))
        peer.stop()
        await changed
        self.assertEqual([name for name, _, _ in seen], [PEER, PEER])
        self.assertEqual(seen[0][1], "")
        self.assertTrue(seen[0][2].startswith(":"))
        self.assertEqual(seen[1][1:], (seen[0][2], ""))

    async def test_signalHandlerFailure(self) -> None:
        """
        A handler that raises is logged, and later signals still arrive.
        """
        Peer(self, self.path, PEER)
        connection = await self.connected()
        pings: list[tuple] = []

        def handler(body: tuple) -> None:
            pings.append(body)
            if len(pings) == 1:
                raise RuntimeError("handler broke")

        from jeepney.bus_messages import MatchRule

        await connection.subscribe(
            MatchRule(type="signal", interface="org.ngrokd.Test", member="Ping"),
            handler,
        )
        await connection.call(call("Emit", "s", ("one",)))
        await connection.call(call("Emit", "s", ("two",)))
        # The signal precedes its call's reply on the one connection.
        self.assertEqual(pings, [("one",), ("two",)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_busGoes(self) -> None:
        """
        When the bus goes away, waiting calls fail with Disconnected and
        when_lost() fires with the reason.
        """
        Peer(self, self.path, PEER)
        connection = await self.connected()
        waiting = connection.call(call("Slow"))
        lost = connection.when_lost()
        self.bus.stop()
        with self.assertRaises(Disconnected):
            await waiting
        self.assertIn("the bus closed the connection", await lost)

    async def test_noBus(self) -> None:
        """
        Without a bus at the path, connect() fails naming the path.
        """
        missing = os.path.join(os.path.dirname(self.path), "nothing")
        with self.assertRaises(Disconnected) as caught:
            await connect(reactor, missing, timeout=5)
        self.assertIn(missing, str(caught.exception))

    async def test_authenticationRefused(self) -> None:
        """
        A bus that refuses EXTERNAL authentication: connect() fails saying
        so.
        """
        path = start_bus(self, auth="ANONYMOUS").path
        with self.assertRaises(Disconnected) as caught:
            await connect(reactor, path, timeout=5)
        self.assertIn("refused authentication", str(caught.exception))
        self.flushLoggedErrors()


class FramingTests(SynchronousTestCase):
    """
    What arrives on the socket, byte for byte.
    """

    def authenticated(self, **options) -> tuple[DBusConnection, StringTransport]:
        self.clock = Clock()
        connection = DBusConnection(self.clock, **options)
        transport = StringTransport()
        connection.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"\0AUTH EXTERNAL "))
        transport.clear()
        connection.dataReceived(b"OK 1234deadbeef\r\n")
        self.assertTrue(transport.value().startswith(b"BEGIN\r\n"))
        hello = Message.from_buffer(transport.value()[len(b"BEGIN\r\n") :])
        transport.clear()
        ready = connection.when_ready()
        reply = new_method_return(hello, "s", (":1.7",))
        reply.header.fields[HeaderFields.reply_serial] = hello.header.serial
        connection.dataReceived(reply.serialise(serial=1))
        self.assertIs(self.successResultOf(ready), connection)
        self.assertEqual(connection.unique_name, ":1.7")
        return connection, transport

    def test_partialMessages(self) -> None:
        """
        Replies split over many reads, in another order than their calls,
        are each matched to their call by serial.
        """
        connection, transport = self.authenticated()
        first = connection.call(call("Echo"))
        second = connection.call(call("Echo"))
        sent = transport.value()
        size = len(sent) // 2
        calls = [Message.from_buffer(sent[:size]), Message.from_buffer(sent[size:])]
        replies = b"".join(
            new_method_return(m, "s", (f"for {m.header.serial}",)).serialise(serial=9)
            for m in reversed(calls)
        )
        for i in range(0, len(replies) - 10, 7):
            connection.dataReceived(replies[i : i + 7])
        self.assertEqual(
            self.successResultOf(second), (f"for {calls[1].header.serial}",)
        )
        self.assertNoResult(first)
        connection.dataReceived(replies[i + 7 :])
        self.assertEqual(
            self.successResultOf(first), (f"for {calls[0].header.serial}",)
        )

    def test_garbage(self) -> None:
        """
        Bytes that are not D-Bus close the connection and fail the waiting
        calls with the reason.
        """
        connection, transport = self.authenticated()
        waiting = connection.call(call("Echo"))
        connection.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        connection.connectionLost()
        failure = self.failureResultOf(waiting, Disconnected)
        self.assertIn("not a D-Bus message", str(failure.value))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_declaredSizeBounded(self) -> None:
        """
        A header declaring a body over the limit closes the connection at
        once, before that body is buffered.
        """
        connection, transport = self.authenticated(max_message=1000)
        header = b"l\x02\x01\x01" + (10**6).to_bytes(4, "little") + b"\x01\0\0\0"
        connection.dataReceived(header + b"\0\0\0\0")
        self.assertTrue(transport.disconnecting)
        connection.connectionLost()
        self.assertIn(
            "over the limit of 1000", self.successResultOf(connection.when_lost())
        )

    def test_timeoutWithClock(self) -> None:
        """
        A call's timeout is its own: the timer is cancelled by the reply.
        """
        connection, transport = self.authenticated()
        d = connection.call(call("Echo"), timeout=5)
        message = Message.from_buffer(transport.value())
        self.clock.advance(4)
        connection.dataReceived(new_method_return(message).serialise(serial=3))
        self.assertEqual(self.successResultOf(d), ())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        late = connection.call(call("Echo"), timeout=5)
        self.clock.advance(5)
        self.failureResultOf(late, CallTimedOut)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_methodCallAnswered(self) -> None:
        """
        A method call to this connection is answered with UnknownMethod
        (nothing is offered), as a D-Bus peer must; not when the caller
        expects no reply.
        """
        connection, transport = self.authenticated()
        incoming = method_call(OBJECT, "Anything")
        incoming.header.fields[HeaderFields.sender] = ":1.9"
        connection.dataReceived(incoming.serialise(serial=41))
        answer = Message.from_buffer(transport.value())
        self.assertEqual(answer.header.message_type, MessageType.error)
        self.assertEqual(answer.header.fields[HeaderFields.reply_serial], 41)
        self.assertEqual(
            answer.header.fields[HeaderFields.error_name],
            "org.freedesktop.DBus.Error.UnknownMethod",
        )
        transport.clear()
        incoming.header.flags |= 1
        connection.dataReceived(incoming.serialise(serial=42))
        self.assertEqual(transport.value(), b"")
