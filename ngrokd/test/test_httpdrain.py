"""
Tests for L{ngrokd.datapath.httpdrain}: once the grace starts, a keep-alive
HTTP connection ends at a response boundary, the last answer saying
C{Connection: close}, and no response is cut.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.datapath.httpdrain import MAX_OUTSTANDING, Exchanges
from ngrokd.datapath.httpframing import MAX_HEAD

GET = b"GET /%d HTTP/1.1\r\nHost: web.test\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OK_CLOSING = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _answered(exchanges: Exchanges, *requests: bytes) -> None:
    """
    Pass C{requests} up and an C{OK} down for each.
    """
    for request in requests:
        exchanges.upstream(request)
        exchanges.downstream(OK)


class DrainTests(SynchronousTestCase):
    """
    When the grace starts, what a connection is doing decides when it ends.
    """

    def test_idleEndsAtOnce(self) -> None:
        """
        A connection idle between requests ends at once.
        """
        exchanges = Exchanges(None)
        _answered(exchanges, GET % 1, GET % 2)
        self.assertFalse(exchanges.ended)
        exchanges.drain()
        self.assertTrue(exchanges.ended)

    def test_inFlightAnswerSaysClose(self) -> None:
        """
        The answer to a request in flight says C{Connection: close}, whole
        and otherwise unchanged; the connection ends after its last byte.
        """
        exchanges = Exchanges(None)
        _answered(exchanges, GET % 1)
        exchanges.upstream(GET % 2)
        exchanges.drain()
        self.assertFalse(exchanges.ended)
        self.assertEqual(exchanges.downstream(OK[:-1]), OK_CLOSING[:-1])
        self.assertFalse(exchanges.ended)
        self.assertEqual(exchanges.downstream(OK[-1:]), b"k")
        self.assertTrue(exchanges.ended)

    def test_requestHalfSent(self) -> None:
        """
        A request whose head is still coming is in flight: it is passed on
        and answered.
        """
        exchanges = Exchanges(None)
        _answered(exchanges, GET % 1)
        request = GET % 2
        self.assertEqual(exchanges.upstream(request[:5]), b"")
        exchanges.drain()
        self.assertEqual(exchanges.upstream(request[5:]), request)
        self.assertEqual(exchanges.downstream(OK), OK_CLOSING)
        self.assertTrue(exchanges.ended)

    def test_firstRequestAwaited(self) -> None:
        """
        A connection that has not sent its first request yet (its client
        connected just before the stop) gets that request answered.
        """
        exchanges = Exchanges(None)
        exchanges.drain()
        self.assertFalse(exchanges.ended)
        self.assertEqual(exchanges.upstream(GET % 1), GET % 1)
        self.assertEqual(exchanges.downstream(OK), OK_CLOSING)
        self.assertTrue(exchanges.ended)

    def test_nothingAfterTheLast(self) -> None:
        """
        A request that begins after the grace started is not passed on, nor
        is anything the server sends after the last answer.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(GET % 1)
        exchanges.drain()
        self.assertEqual(exchanges.upstream(GET % 2), b"")
        self.assertEqual(exchanges.downstream(OK + b"HTTP/1.1 200 OK\r\n"), OK_CLOSING)
        self.assertTrue(exchanges.ended)

    def test_pipelined(self) -> None:
        """
        Of requests pipelined before the grace, every one is answered and
        only the last answer says C{Connection: close}.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(GET % 1 + GET % 2)
        exchanges.drain()
        self.assertEqual(exchanges.upstream(GET % 3), b"")
        self.assertEqual(exchanges.downstream(OK + OK), OK + OK_CLOSING)
        self.assertTrue(exchanges.ended)

    def test_keepAliveReplaced(self) -> None:
        """
        The server's C{Connection: keep-alive} gives way to C{close}, for
        HTTP/1.0 as for 1.1, and bare line feeds stay bare.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        exchanges.drain()
        response = (
            b"HTTP/1.0 200 OK\nConnection: keep-alive\nKeep-Alive: timeout=5\n"
            b"Content-Length: 2\n\nok"
        )
        self.assertEqual(
            exchanges.downstream(response),
            b"HTTP/1.0 200 OK\nKeep-Alive: timeout=5\nContent-Length: 2\n"
            b"Connection: close\n\nok",
        )
        self.assertTrue(exchanges.ended)

    def test_closeAlreadySaid(self) -> None:
        """
        An answer that already says C{Connection: close} passes unchanged.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(GET % 1)
        exchanges.drain()
        self.assertEqual(exchanges.downstream(OK_CLOSING), OK_CLOSING)
        self.assertTrue(exchanges.ended)

    def test_headHeldWhileIncomplete(self) -> None:
        """
        A response head is held back until complete (so that it can still
        say C{Connection: close}), its body is not.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(GET % 1)
        self.assertEqual(exchanges.downstream(OK[:10]), b"")
        self.assertEqual(exchanges.downstream(OK[10:-1]), OK[:-1])
        self.assertEqual(exchanges.downstream(OK[-1:]), OK[-1:])

    @given(st.lists(st.integers(0, 200), max_size=8), st.integers(0, 4))
    def test_anySplit(self, cuts: list[int], drain_at: int) -> None:
        """
        However the server's bytes are split, and whichever piece the grace
        starts before, every response arrives whole, in order, and the
        connection ends exactly after the last byte of the last one.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(GET % 1 + GET % 2 + b"HEAD / HTTP/1.1\r\n\r\n")
        responses = [
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;x=y\r\nhello\r\n3\r\nabc\r\nA\r\n0123456789\n0\r\nTrailer: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
        ]
        stream = b"".join(responses)
        pieces = _split(stream, [cut % (len(stream) + 1) for cut in cuts])
        out = []
        fed = 0
        for n, piece in enumerate(pieces):
            if n == drain_at:
                exchanges.drain()
            self.assertEqual(exchanges.ended, fed == len(stream) and drain_at <= n)
            out.append(exchanges.downstream(piece))
            fed += len(piece)
        self.assertEqual(b"".join(out).replace(b"Connection: close\r\n", b""), stream)
        self.assertEqual(exchanges.ended, drain_at < len(pieces))


class NoBodyTests(SynchronousTestCase):
    """
    Answers that end with their head end the connection there.
    """

    def drained(self, request: bytes, response: bytes) -> Exchanges:
        exchanges = Exchanges(None)
        exchanges.upstream(request)
        exchanges.drain()
        exchanges.downstream(response)
        return exchanges

    def test_head(self) -> None:
        """
        The answer to HEAD has no body, whatever its Content-Length says.
        """
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        exchanges = self.drained(b"HEAD / HTTP/1.1\r\n\r\n", response)
        self.assertTrue(exchanges.ended)

    def test_noContentNotModified(self) -> None:
        """
        204 and 304 have no body.
        """
        for status in [b"204 No Content", b"304 Not Modified"]:
            response = b"HTTP/1.1 " + status + b"\r\nContent-Length: 5\r\n\r\n"
            self.assertTrue(self.drained(GET % 1, response).ended)

    def test_interimThenFinal(self) -> None:
        """
        A 1xx answer is not the last: the final one that follows is.
        """
        exchanges = self.drained(
            GET % 1, b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        )
        self.assertFalse(exchanges.ended)
        self.assertEqual(exchanges.downstream(OK), OK_CLOSING)
        self.assertTrue(exchanges.ended)


class UntrackedTests(SynchronousTestCase):
    """
    A connection that is no longer HTTP/1.x keeps the grace, as a TCP one
    does, and every byte passes.
    """

    def assertUntracked(self, exchanges: Exchanges) -> None:
        self.assertFalse(exchanges.tracking)
        exchanges.drain()
        self.assertFalse(exchanges.ended)
        self.assertEqual(exchanges.downstream(b"more"), b"more")
        self.assertEqual(exchanges.upstream(GET % 9), GET % 9)
        self.assertFalse(exchanges.ended)

    def test_webSocket(self) -> None:
        """
        After a WebSocket upgrade, the connection is left alone.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(
            b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        switched = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        self.assertEqual(
            exchanges.downstream(switched + b"\x81\x00"), switched + b"\x81\x00"
        )
        self.assertUntracked(exchanges)

    def test_untilClose(self) -> None:
        """
        A response without a length ends where the connection does: the
        server closes it.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(GET % 1)
        self.assertEqual(
            exchanges.downstream(b"HTTP/1.0 200 OK\r\n\r\nbody"),
            b"HTTP/1.0 200 OK\r\n\r\nbody",
        )
        self.assertUntracked(exchanges)

    def test_notHttp(self) -> None:
        """
        A server that does not answer in HTTP/1.x has its bytes passed on at
        once, unchanged.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(GET % 1)
        self.assertEqual(exchanges.downstream(b"SSH-2.0"), b"SSH-2.0")
        self.assertUntracked(exchanges)

    def test_responseHeadTooLarge(self) -> None:
        """
        A response head over L{MAX_HEAD} is not held any longer: every byte
        is passed on.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(GET % 1)
        head = b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD
        self.assertEqual(exchanges.downstream(head), head)
        self.assertUntracked(exchanges)

    def test_heldHeadFlushedWhenRequestsStopBeingFramed(self) -> None:
        """
        A partial response head held when the requests leave HTTP comes
        out with the server's next bytes.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(GET % 1)
        self.assertEqual(exchanges.downstream(OK[:10]), b"")
        exchanges.upstream(b"\x16\x03\x01")
        self.assertEqual(exchanges.downstream(OK[10:]), OK)
        self.assertUntracked(exchanges)

    def test_tooManyUnanswered(self) -> None:
        """
        More than L{MAX_OUTSTANDING} requests waiting for their answer are
        not remembered: the connection is left to the grace.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(GET % 1 * (MAX_OUTSTANDING + 1))
        self.assertUntracked(exchanges)


class RequestSideTests(SynchronousTestCase):
    """
    The requests pass as they would without the drain.
    """

    def test_virtualModeUntouched(self) -> None:
        """
        With no host to rewrite, requests pass byte for byte.
        """
        request = b"GET / HTTP/1.1\r\nhost:  Web.Test \r\nHost: other\r\n\r\n"
        self.assertEqual(Exchanges(None).upstream(request), request)

    def test_networkModeRewritten(self) -> None:
        """
        With a host, requests get it, as L{HostRewriter} gives it.
        """
        self.assertEqual(
            Exchanges("web.test").upstream(b"GET / HTTP/1.1\r\nHost: x:9080\r\n\r\n"),
            b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n",
        )

    def test_clientDoneStillTracked(self) -> None:
        """
        A client that stopped sending after its request (a half-close) is
        still answered in full, and then the connection ends.
        """
        exchanges = Exchanges(None)
        exchanges.upstream(GET % 1)
        self.assertEqual(exchanges.upstream_done(), b"")
        exchanges.drain()
        self.assertEqual(exchanges.downstream(OK), OK_CLOSING)
        self.assertTrue(exchanges.ended)
