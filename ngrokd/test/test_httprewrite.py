"""
Tests for L{ngrokd.datapath.httprewrite}: every request on a connection reaches ngrok
with the endpoint's Host, and no byte is ever lost or held back longer than
its request head.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.datapath.httpframing import MAX_HEAD
from ngrokd.datapath.httprewrite import HostRewriter, InvalidHost

HOST = "web.prod"


def _feed(rewriter: HostRewriter, pieces: list[bytes]) -> bytes:
    return b"".join(rewriter.feed(piece) for piece in pieces)


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


class HostHeaderTests(SynchronousTestCase):
    """
    Each request head gets exactly one Host, the endpoint's, and keeps every
    other byte.
    """

    def test_keepAlive(self) -> None:
        """
        Every request on a keep-alive connection gets the endpoint's Host, not
        only the first.
        """
        rewriter = HostRewriter(HOST)
        for client_host in [b"localhost:9080", b"127.0.0.1:9080", b"other.example"]:
            self.assertEqual(
                rewriter.feed(b"GET /x HTTP/1.1\r\nHost: " + client_host + b"\r\n\r\n"),
                b"GET /x HTTP/1.1\r\nHost: web.prod\r\n\r\n",
            )
        self.assertFalse(rewriter.passthrough)
        self.assertIsNone(rewriter.gave_up)

    def test_pipelined(self) -> None:
        """
        Requests pipelined in one read are each rewritten, and come back as one
        piece of bytes for one write.
        """
        request = b"GET /%d HTTP/1.1\r\nHost: localhost:9080\r\nAccept: */*\r\n\r\n"
        expected = b"GET /%d HTTP/1.1\r\nHost: web.prod\r\nAccept: */*\r\n\r\n"
        out = HostRewriter(HOST).feed(b"".join(request % i for i in range(3)))
        self.assertIsInstance(out, bytes)
        self.assertEqual(out, b"".join(expected % i for i in range(3)))

    def test_headHeldUntilComplete(self) -> None:
        """
        A head arriving a byte at a time is held back until its blank line,
        then sent whole in one write rather than one per header line.
        """
        head = b"GET / HTTP/1.1\r\nHost: localhost:9080\r\nAccept: */*\r\n\r\n"
        rewriter = HostRewriter(HOST)
        outputs = [rewriter.feed(byte) for byte in _bytewise(head)]
        self.assertEqual(outputs[:-1], [b""] * (len(head) - 1))
        self.assertEqual(
            outputs[-1], b"GET / HTTP/1.1\r\nHost: web.prod\r\nAccept: */*\r\n\r\n"
        )

    def test_absentHostInserted(self) -> None:
        """
        A request without Host gets one right after its request line, with the
        request line's line end.
        """
        rewriter = HostRewriter(HOST)
        self.assertEqual(
            rewriter.feed(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"),
            b"GET / HTTP/1.1\r\nHost: web.prod\r\nAccept: */*\r\n\r\n",
        )
        self.assertEqual(
            rewriter.feed(b"GET / HTTP/1.1\n\n"), b"GET / HTTP/1.1\nHost: web.prod\n\n"
        )

    def test_duplicateHost(self) -> None:
        """
        Of several Host headers the first is rewritten in place and the others
        are removed.
        """
        self.assertEqual(
            HostRewriter(HOST).feed(
                b"GET / HTTP/1.1\r\nA: 1\r\nHost: a\r\nB: 2\r\nhost: b\r\n"
                b"HOST: c\r\nC: 3\r\n\r\n"
            ),
            b"GET / HTTP/1.1\r\nA: 1\r\nHost: web.prod\r\nB: 2\r\nC: 3\r\n\r\n",
        )

    def test_lowercaseHost(self) -> None:
        """
        The Host header's name keeps the client's case and spacing; only its
        value changes.
        """
        self.assertEqual(
            HostRewriter(HOST).feed(b"GET / HTTP/1.1\r\nhost:localhost\r\n\r\n"),
            b"GET / HTTP/1.1\r\nhost:web.prod\r\n\r\n",
        )
        self.assertEqual(
            HostRewriter(HOST).feed(b"GET / HTTP/1.1\r\nHOST: \t localhost \t\r\n\r\n"),
            b"GET / HTTP/1.1\r\nHOST: \t web.prod \t\r\n\r\n",
        )

    def test_emptyHost(self) -> None:
        """
        An empty Host header gets the endpoint's value.
        """
        self.assertEqual(
            HostRewriter(HOST).feed(b"GET / HTTP/1.1\r\nHost:\r\n\r\n"),
            b"GET / HTTP/1.1\r\nHost:web.prod\r\n\r\n",
        )

    def test_otherHeadersUntouched(self) -> None:
        """
        Headers that merely look like Host, and the order, case and spacing of
        every other header, pass exactly as sent.
        """
        head = (
            b"POST /api?q=host HTTP/1.1\r\nX-Forwarded-Host: localhost:9080\r\n"
            b"hostname:  a\r\nuSeR-aGeNt:curl/8\t\r\nHost: localhost\r\n\r\n"
        )
        self.assertEqual(
            HostRewriter(HOST).feed(head),
            head.replace(b"Host: localhost\r", b"Host: web.prod\r"),
        )

    def test_bareLineFeeds(self) -> None:
        """
        A request whose lines end in bare LF keeps them.
        """
        self.assertEqual(
            HostRewriter(HOST).feed(b"GET / HTTP/1.1\nHost: x\nA: b\n\n"),
            b"GET / HTTP/1.1\nHost: web.prod\nA: b\n\n",
        )

    def test_http10(self) -> None:
        """
        HTTP/1.0 requests, which may lack Host, get the endpoint's, on every
        request of a keep-alive connection.
        """
        rewriter = HostRewriter(HOST)
        self.assertEqual(
            rewriter.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
            b"GET / HTTP/1.0\r\nHost: web.prod\r\nConnection: keep-alive\r\n\r\n",
        )
        self.assertEqual(
            rewriter.feed(b"GET /b HTTP/1.0\r\nHost: localhost\r\n\r\n"),
            b"GET /b HTTP/1.0\r\nHost: web.prod\r\n\r\n",
        )

    def test_hostWithPort(self) -> None:
        """
        The Host value is written exactly as given, port included.
        """
        self.assertEqual(
            HostRewriter("web.prod:8080").feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            b"GET / HTTP/1.1\r\nHost: web.prod:8080\r\n\r\n",
        )

    def test_absoluteForm(self) -> None:
        """
        An absolute-form target names the endpoint too, since a server routes
        by it rather than by Host; user info, path and query are kept.
        """
        self.assertEqual(
            HostRewriter(HOST).feed(
                b"GET http://localhost:9080/a?b=c HTTP/1.1\r\nHost: localhost\r\n\r\n"
            ),
            b"GET http://web.prod/a?b=c HTTP/1.1\r\nHost: web.prod\r\n\r\n",
        )
        self.assertEqual(
            HostRewriter(HOST).feed(b"GET http://u:p@[::1]:9080 HTTP/1.1\r\n\r\n"),
            b"GET http://u:p@web.prod HTTP/1.1\r\nHost: web.prod\r\n\r\n",
        )

    def test_asteriskForm(self) -> None:
        """
        C{OPTIONS *} keeps its target.
        """
        self.assertEqual(
            HostRewriter(HOST).feed(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"),
            b"OPTIONS * HTTP/1.1\r\nHost: web.prod\r\n\r\n",
        )

    def test_leadingBlankLines(self) -> None:
        """
        Empty lines before a request line, which servers ignore, pass through
        and do not hide the request behind them, even split between reads.
        """
        rewriter = HostRewriter(HOST)
        self.assertEqual(
            rewriter.feed(b"\r\n\nGET / HTTP/1.1\r\nHost: x\r\n\r\n\r"),
            b"\r\n\nGET / HTTP/1.1\r\nHost: web.prod\r\n\r\n",
        )
        self.assertEqual(
            rewriter.feed(b"\nGET / HTTP/1.1\r\n\r\n"),
            b"\r\nGET / HTTP/1.1\r\nHost: web.prod\r\n\r\n",
        )
        self.assertIsNone(rewriter.gave_up)

    def test_invalidHost(self) -> None:
        """
        A Host value that cannot be written into a header is refused up front,
        naming the value.
        """
        for host in ["", "web prod", "web.prod\r\nX: y", "wéb.prod", "a/b", "u@h"]:
            error = self.assertRaises(InvalidHost, HostRewriter, host)
            self.assertIn(repr(host), str(error))


class BodyTests(SynchronousTestCase):
    """
    Bodies pass as they arrive, untouched, and their framing is followed so
    that the next request is found.
    """

    def test_contentLength(self) -> None:
        """
        A sized body passes untouched even when it looks like a request, and
        the request after it is rewritten.
        """
        body = b"GET / HTTP/1.1\r\nHost: evil\r\n\r\n"
        stream = (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
            + b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
        )
        self.assertEqual(
            HostRewriter(HOST).feed(stream),
            b"POST / HTTP/1.1\r\nHost: web.prod\r\nContent-Length: %d\r\n\r\n"
            % len(body)
            + body
            + b"GET / HTTP/1.1\r\nHost: web.prod\r\n\r\n",
        )

    def test_bodyStreams(self) -> None:
        """
        Body bytes are passed on as soon as they arrive, not held until the
        body is complete (the Go original stalled responses until then).
        """
        rewriter = HostRewriter(HOST)
        self.assertEqual(
            rewriter.feed(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
            b"PUT / HTTP/1.1\r\nHost: web.prod\r\nContent-Length: 10\r\n\r\nabc",
        )
        self.assertEqual(rewriter.feed(b"defg"), b"defg")
        self.assertEqual(
            rewriter.feed(b"hijGET / HTTP/1.1\r\n\r\n"),
            b"hijGET / HTTP/1.1\r\nHost: web.prod\r\n\r\n",
        )

    def test_bodyNotCopied(self) -> None:
        """
        A read that is all body is passed on as the very same object.
        """
        rewriter = HostRewriter(HOST)
        rewriter.feed(b"PUT / HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
        chunk = bytes(range(256)) * 100
        self.assertIs(rewriter.feed(chunk), chunk)

    def test_repeatedContentLength(self) -> None:
        """
        Repeated identical Content-Length values frame the body once.
        """
        stream = (
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\ncontent-length: 03\r\n\r\n"
            b"abcGET / HTTP/1.1\r\n\r\n"
        )
        self.assertEqual(
            HostRewriter(HOST).feed(stream),
            b"POST / HTTP/1.1\r\nHost: web.prod\r\nContent-Length: 3, 3\r\n"
            b"content-length: 03\r\n\r\nabcGET / HTTP/1.1\r\nHost: web.prod\r\n\r\n",
        )

    def test_noLengthNoBody(self) -> None:
        """
        A request without Content-Length or Transfer-Encoding has no body: what
        follows its head is the next request.
        """
        self.assertEqual(
            HostRewriter(HOST).feed(
                b"DELETE /a HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /b HTTP/1.1\r\nHost: y\r\n\r\n"
            ),
            b"DELETE /a HTTP/1.1\r\nHost: web.prod\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: web.prod\r\n\r\n",
        )

    _CHUNKED = (
        b"POST /up HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        b"Trailer: X-Sum\r\n\r\n"
        b"1B;name=value;flag\r\n"
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\r\n"
        b'3 ;q="a b"\r\nxyz\r\n'
        b"0;last\r\nX-Sum: 42\r\nHost: trailer\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    _CHUNKED_OUT = (
        b"POST /up HTTP/1.1\r\nHost: web.prod\r\nTransfer-Encoding: chunked\r\n"
        b"Trailer: X-Sum\r\n\r\n"
        b"1B;name=value;flag\r\n"
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\r\n"
        b'3 ;q="a b"\r\nxyz\r\n'
        b"0;last\r\nX-Sum: 42\r\nHost: trailer\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: web.prod\r\n\r\n"
    )

    def test_chunked(self) -> None:
        """
        A chunked body, with chunk extensions and trailers, passes untouched
        and the request after it is rewritten.
        """
        rewriter = HostRewriter(HOST)
        self.assertEqual(rewriter.feed(self._CHUNKED), self._CHUNKED_OUT)
        self.assertIsNone(rewriter.gave_up)

    def test_chunksNotCopied(self) -> None:
        """
        A read of whole chunks and their framing is passed on as the very
        same object, however many chunks it holds.
        """
        rewriter = HostRewriter(HOST)
        rewriter.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunks = b"".join(b"%x\r\n%s\r\n" % (n, b"x" * n) for n in range(1, 40))
        self.assertIs(rewriter.feed(chunks), chunks)
        self.assertIsNone(rewriter.gave_up)

    def test_chunkedBytewise(self) -> None:
        """
        A chunked body arriving a byte at a time gives the same stream, and
        each byte of chunk data is passed on the moment it arrives.
        """
        rewriter = HostRewriter(HOST)
        outputs = [rewriter.feed(byte) for byte in _bytewise(self._CHUNKED)]
        self.assertEqual(b"".join(outputs), self._CHUNKED_OUT)
        data_start = self._CHUNKED.index(b"flag\r\n") + len(b"flag\r\n")
        self.assertEqual(
            outputs[data_start : data_start + 0x1B],
            _bytewise(self._CHUNKED[data_start : data_start + 0x1B]),
        )

    def test_chunkedAfterOtherCodings(self) -> None:
        """
        A body whose last transfer coding is chunked is framed by its chunks.
        """
        stream = (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n"
            b"transfer-encoding: CHUNKED\r\n\r\n"
            b"2\nab\n0\n\nGET / HTTP/1.1\r\n\r\n"
        )
        self.assertEqual(
            HostRewriter(HOST).feed(stream),
            b"POST / HTTP/1.1\r\nHost: web.prod\r\nTransfer-Encoding: gzip\r\n"
            b"transfer-encoding: CHUNKED\r\n\r\n"
            b"2\nab\n0\n\nGET / HTTP/1.1\r\nHost: web.prod\r\n\r\n",
        )

    def test_expectContinue(self) -> None:
        """
        A head with C{Expect: 100-continue} is sent at once, so the server can
        answer 100 before the body exists; the body follows when it comes.
        """
        rewriter = HostRewriter(HOST)
        self.assertEqual(
            rewriter.feed(
                b"PUT /f HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\n\r\n"
            ),
            b"PUT /f HTTP/1.1\r\nHost: web.prod\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n",
        )
        self.assertEqual(rewriter.feed(b"hello"), b"hello")
        self.assertEqual(
            rewriter.feed(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            b"GET / HTTP/1.1\r\nHost: web.prod\r\n\r\n",
        )


class CountTests(SynchronousTestCase):
    """
    It counts the requests a client begins, and can stop before one.
    """

    def test_noHostFramesOnly(self) -> None:
        """
        Given no host, every byte passes as sent, and requests are framed
        and counted all the same.
        """
        methods: list[bytes] = []
        rewriter = HostRewriter(None, methods.append)
        request = b"HEAD /a HTTP/1.1\r\nhost: x\r\nContent-Length: 1\r\n\r\n1"
        self.assertEqual(rewriter.feed(request + b"GET /b HTTP/1.1\r\n"), request)
        self.assertEqual((rewriter.begun, methods), (2, [b"HEAD"]))

    def test_stopAfter(self) -> None:
        """
        After C{stop_after(n)}, the nth request passes in full, and nothing
        from the next one's first byte on.
        """
        rewriter = HostRewriter(HOST)
        rewriter.feed(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab")
        rewriter.stop_after(1)
        self.assertEqual(rewriter.feed(b"cd\r\nGET / HTTP/1.1\r\n\r\n"), b"cd\r\n")
        self.assertTrue(rewriter.stopped)
        self.assertEqual(rewriter.feed(b"more"), b"")
        self.assertEqual(rewriter.begun, 1)


class SwitchTests(SynchronousTestCase):
    """
    After a request that may switch protocols the stream is no longer HTTP,
    and passes untouched.
    """

    def test_connect(self) -> None:
        """
        A CONNECT head is rewritten (its target kept); every byte after it
        passes untouched, even bytes that look like a request.
        """
        rewriter = HostRewriter(HOST)
        self.assertEqual(
            rewriter.feed(
                b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n"
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            ),
            b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: web.prod\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        self.assertTrue(rewriter.passthrough)
        self.assertIsNone(rewriter.gave_up)
        self.assertEqual(rewriter.feed(b"\x00\x01\r\n\r\n"), b"\x00\x01\r\n\r\n")

    def test_webSocket(self) -> None:
        """
        After a WebSocket upgrade request, frames pass untouched.
        """
        rewriter = HostRewriter(HOST)
        frame = b"\x81\x05hello"
        self.assertEqual(
            rewriter.feed(
                b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                b"Connection: keep-alive, Upgrade\r\n\r\n" + frame
            ),
            b"GET /ws HTTP/1.1\r\nHost: web.prod\r\nUpgrade: websocket\r\n"
            b"Connection: keep-alive, Upgrade\r\n\r\n" + frame,
        )
        self.assertTrue(rewriter.passthrough)
        self.assertIsNone(rewriter.gave_up)
        self.assertEqual(
            rewriter.feed(b"GET / HTTP/1.1\r\n\r\n"), b"GET / HTTP/1.1\r\n\r\n"
        )

    def test_upgradeNeedsConnection(self) -> None:
        """
        An Upgrade header without C{Connection: upgrade} switches nothing.
        """
        rewriter = HostRewriter(HOST)
        self.assertEqual(
            rewriter.feed(
                b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: close\r\n\r\n"
                b"GET / HTTP/1.1\r\n\r\n"
            ),
            b"GET / HTTP/1.1\r\nHost: web.prod\r\nUpgrade: h2c\r\n"
            b"Connection: close\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: web.prod\r\n\r\n",
        )
        self.assertFalse(rewriter.passthrough)


class MalformedTests(SynchronousTestCase):
    """
    What it cannot frame passes through byte for byte, with the reason kept
    for the caller to log once.
    """

    def assertPassedThrough(self, stream: bytes, reason: str) -> None:
        """
        C{stream} comes out unchanged whether fed at once or a byte at a time,
        leaving the rewriter in passthrough with a reason containing C{reason}.
        """
        for pieces in [[stream], _bytewise(stream)]:
            rewriter = HostRewriter(HOST)
            out = _feed(rewriter, pieces)
            self.assertEqual(out, stream)
            self.assertTrue(rewriter.passthrough)
            gave_up = rewriter.gave_up
            assert gave_up is not None
            self.assertIn(reason, gave_up)
            self.assertEqual(
                rewriter.feed(b"GET / HTTP/1.1\r\n\r\n"), b"GET / HTTP/1.1\r\n\r\n"
            )

    def test_notHttp1(self) -> None:
        """
        Other HTTP versions, the HTTP/2 preface and HTTP/0.9 are not rewritten.
        """
        for stream in [
            b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET / http/1.1\r\n\r\n",
        ]:
            self.assertPassedThrough(stream, "is not HTTP/1.x")

    def test_invalidRequestLine(self) -> None:
        """
        A request line with extra spaces or a bad method is not rewritten.
        """
        for stream in [
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 \r\n\r\n",
            b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a\rb HTTP/1.1\r\n\r\n",
        ]:
            self.assertPassedThrough(stream, "request line")

    def test_otherProtocolNotHeld(self) -> None:
        """
        A client speaking another protocol first (TLS, SSH) is passed through
        at once instead of being held waiting for a blank line.
        """
        hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"
        rewriter = HostRewriter(HOST)
        self.assertEqual(rewriter.feed(hello), hello)
        self.assertIn("not a method", rewriter.gave_up or "")
        rewriter = HostRewriter(HOST)
        self.assertEqual(rewriter.feed(b"SSH-2.0-"), b"")
        self.assertEqual(rewriter.feed(b"OpenSSH_9.6\r\n"), b"SSH-2.0-OpenSSH_9.6\r\n")
        self.assertIn("is not HTTP/1.x", rewriter.gave_up or "")

    def test_headerWithoutColon(self) -> None:
        """
        A header line without a colon is not rewritten.
        """
        self.assertPassedThrough(
            b"GET / HTTP/1.1\r\nHost: x\r\nnonsense\r\n\r\n", "has no colon"
        )

    def test_invalidHeaderName(self) -> None:
        """
        Whitespace before a header's colon, which RFC 9112 forbids because
        parsers disagree on it, stops the rewrite.
        """
        self.assertPassedThrough(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", "header name")

    def test_lineFolding(self) -> None:
        """
        Obsolete line folding is not rewritten.
        """
        self.assertPassedThrough(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n", "line folding"
        )

    def test_bareCarriageReturn(self) -> None:
        """
        A bare CR inside a header value is not rewritten.
        """
        self.assertPassedThrough(
            b"GET / HTTP/1.1\r\nX-A: a\rb\r\nHost: x\r\n\r\n", "CR or NUL"
        )

    def test_contentLengthNotANumber(self) -> None:
        """
        A Content-Length that is not a plain decimal number is not rewritten.
        """
        for value in [b"abc", b"-1", b"+5", b"0x10", b"", b"1_0", b"5 5"]:
            self.assertPassedThrough(
                b"POST / HTTP/1.1\r\nContent-Length: " + value + b"\r\n\r\n12345",
                "is not a number",
            )

    def test_conflictingContentLength(self) -> None:
        """
        Different Content-Length values are not rewritten.
        """
        for lengths in [
            b"Content-Length: 1, 2\r\n",
            b"Content-Length: 1\r\nContent-Length: 2\r\n",
        ]:
            self.assertPassedThrough(
                b"POST / HTTP/1.1\r\n" + lengths + b"\r\nab",
                "conflicting Content-Length",
            )

    def test_lengthAndChunked(self) -> None:
        """
        A request with both Content-Length and Transfer-Encoding, the classic
        smuggling vector, is not rewritten.
        """
        self.assertPassedThrough(
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n",
            "both Content-Length and Transfer-Encoding",
        )

    def test_notChunked(self) -> None:
        """
        A Transfer-Encoding that does not end in chunked leaves the body's end
        unknown, so nothing is rewritten.
        """
        self.assertPassedThrough(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
            "does not end in chunked",
        )

    def test_chunkedHttp10(self) -> None:
        """
        Transfer-Encoding in an HTTP/1.0 request is faulty framing (RFC 9112
        section 6.1), so nothing is rewritten.
        """
        self.assertPassedThrough(
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.0",
        )

    def test_headTooLarge(self) -> None:
        """
        A head longer than L{MAX_HEAD} is passed on as soon as the limit is
        crossed, whether it came in one read or many.
        """
        head = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD
        rewriter = HostRewriter(HOST)
        self.assertEqual(rewriter.feed(head), head)
        self.assertIn("larger than 65536", rewriter.gave_up or "")

        rewriter = HostRewriter(HOST)
        pieces = [head[i : i + 1000] for i in range(0, len(head), 1000)]
        outputs = [rewriter.feed(piece) for piece in pieces]
        crossed = MAX_HEAD // 1000
        self.assertEqual(outputs[:crossed], [b""] * crossed)
        self.assertEqual(b"".join(outputs[crossed:]), head)
        self.assertIn("larger than 65536", rewriter.gave_up or "")

    def test_largestHead(self) -> None:
        """
        A head of exactly L{MAX_HEAD} bytes is rewritten, whether it came in
        one read or many.
        """
        start = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: "
        head = start + b"a" * (MAX_HEAD - len(start) - 4) + b"\r\n\r\n"
        self.assertEqual(len(head), MAX_HEAD)
        expected = head.replace(b"Host: a", b"Host: web.prod")
        self.assertEqual(HostRewriter(HOST).feed(head), expected)
        pieces = [head[i : i + 999] for i in range(0, len(head), 999)]
        self.assertEqual(_feed(HostRewriter(HOST), pieces), expected)

    def test_invalidChunkSize(self) -> None:
        """
        After a bad chunk-size line everything passes untouched; the head
        before it was already rewritten.
        """
        rewriter = HostRewriter(HOST)
        self.assertEqual(
            rewriter.feed(
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"zz\r\nGET / HTTP/1.1\r\nHost: y\r\n\r\n"
            ),
            b"POST / HTTP/1.1\r\nHost: web.prod\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nGET / HTTP/1.1\r\nHost: y\r\n\r\n",
        )
        self.assertIn("invalid chunk-size line b'zz'", rewriter.gave_up or "")

    def test_chunkWithoutLineEnd(self) -> None:
        """
        Chunk data longer than its size announced stops the rewrite, and the
        bytes held while looking for its line end are passed on.
        """
        rewriter = HostRewriter(HOST)
        head = (
            b"POST / HTTP/1.1\r\nHost: web.prod\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.assertEqual(rewriter.feed(head + b"2\r\nabc"), head + b"2\r\nab")
        self.assertEqual(rewriter.feed(b"d\r\n0\r\n\r\n"), b"cd\r\n0\r\n\r\n")
        self.assertIn("chunk data followed by b'cd'", rewriter.gave_up or "")

    def test_goodRequestsBeforeBadOne(self) -> None:
        """
        Requests before the malformed one keep their rewrite; the malformed one
        and everything after pass as sent.
        """
        bad = (
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        rewriter = HostRewriter(HOST)
        self.assertEqual(
            rewriter.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" + bad),
            b"GET / HTTP/1.1\r\nHost: web.prod\r\n\r\n" + bad,
        )

    def test_finish(self) -> None:
        """
        When the client stops sending mid-head, C{finish} returns the bytes held
        back, unchanged, and later bytes pass untouched.
        """
        rewriter = HostRewriter(HOST)
        self.assertEqual(rewriter.feed(b"GET / HTTP/1.1\r\nHost: a"), b"")
        self.assertEqual(rewriter.finish(), b"GET / HTTP/1.1\r\nHost: a")
        self.assertTrue(rewriter.passthrough)
        self.assertIsNone(rewriter.gave_up)
        self.assertEqual(rewriter.feed(b"\r\n\r\n"), b"\r\n\r\n")
        self.assertEqual(HostRewriter(HOST).finish(), b"")


_HOST_NAMES = [b"Host", b"host", b"HOST", b"hOsT"]
_OWS = [b"", b" ", b"\t", b"  "]
_CLIENT_HOSTS = [b"localhost:9080", b"127.0.0.1:9080", b"", b"web.prod", b"[::1]"]
_OTHER_NAMES = [
    b"Accept",
    b"User-Agent",
    b"X-Trace",
    b"Cookie",
    b"hostname",
    b"X-Forwarded-Host",
    b"Content-Type",
    b"Expect",
]
_VALUES = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24
).map(str.encode)
_TARGETS = [
    (b"/", b"/"),
    (b"/a/b?c=d&host=x", b"/a/b?c=d&host=x"),
    (b"*", b"*"),
    (b"/x%20y#frag", b"/x%20y#frag"),
    (b"http://localhost:9080/p?q", b"http://web.prod/p?q"),
]
_EXTENSIONS = [b"", b";a=b", b";name", b' ;q="x y"', b"\t;z=1;w"]


@st.composite
def _requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """
    A well-formed request as a client sends it, and as it must reach ngrok.
    """
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"PATCH", b"DELETE"]))
    target, expected_target = draw(st.sampled_from(_TARGETS))
    minor = draw(st.sampled_from([b"0", b"1"]))
    request_line = method + b" %s HTTP/1." + minor + eol
    lines = [
        (name + b":" + value + eol,) * 2
        for name, value in draw(
            st.lists(st.tuples(st.sampled_from(_OTHER_NAMES), _VALUES), max_size=5)
        )
    ]
    host_lines = draw(
        st.lists(
            st.tuples(
                st.sampled_from(_HOST_NAMES),
                st.sampled_from(_OWS),
                st.sampled_from(_CLIENT_HOSTS),
                st.sampled_from(_OWS),
            ),
            max_size=3,
        )
    )
    kind = draw(
        st.sampled_from(
            ["none", "sized", "chunked"] if minor == b"1" else ["none", "sized"]
        )
    )
    body = b""
    framing = b""
    if kind == "sized":
        content = draw(st.binary(max_size=300))
        name = draw(st.sampled_from([b"Content-Length", b"content-length"]))
        framing = name + b": %d" % len(content) + eol
        body = content
    elif kind == "chunked":
        framing = b"Transfer-Encoding: chunked" + eol
        for chunk in draw(st.lists(st.binary(min_size=1, max_size=100), max_size=4)):
            size = draw(st.sampled_from([b"%x", b"%X", b"00%x"])) % len(chunk)
            body += size + draw(st.sampled_from(_EXTENSIONS)) + eol + chunk + eol
        body += b"0" + draw(st.sampled_from(_EXTENSIONS)) + eol
        for value in draw(st.lists(_VALUES, max_size=2)):
            body += b"X-Trailer: " + value + eol
        body += eol
    # Host lines keep their order (the first one is rewritten, later ones
    # removed) but are spread among the other headers.
    positions = sorted(
        draw(
            st.lists(
                st.integers(0, len(lines)),
                min_size=len(host_lines),
                max_size=len(host_lines),
            )
        )
    )
    for index, (name, before, value, after) in reversed(list(enumerate(host_lines))):
        client = name + b":" + before + value + after + eol
        if value == b"":
            # With no value, all the whitespace is before it.
            before, after = before + after, b""
        expected = name + b":" + before + b"web.prod" + after + eol
        lines.insert(positions[index], (client, expected if index == 0 else b""))
    if framing:
        lines.insert(draw(st.integers(0, len(lines))), (framing, framing))
    blank = draw(st.sampled_from([b"", eol]))
    client_head = blank + request_line % target + b"".join(c for c, _ in lines) + eol
    inserted = b"" if host_lines else b"Host: web.prod" + eol
    expected_head = (
        blank
        + request_line % expected_target
        + inserted
        + b"".join(e for _, e in lines)
        + eol
    )
    return client_head + body, expected_head + body


_STREAMS = st.lists(_requests(), min_size=1, max_size=4).map(
    lambda pairs: (b"".join(c for c, _ in pairs), b"".join(e for _, e in pairs))
)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """
    Well-formed requests with a few bytes inserted, deleted or replaced:
    streams that are almost HTTP.
    """
    stream = bytearray(draw(_STREAMS)[0])
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(stream)))
        byte = draw(st.sampled_from(b"\r\n\t :;,0aZ\x00"))
        operation = draw(st.sampled_from(["insert", "delete", "replace"]))
        if operation == "insert":
            stream.insert(at, byte)
        elif at < len(stream):
            if operation == "delete":
                del stream[at]
            else:
                stream[at] = byte
    return bytes(stream)


class PropertyTests(SynchronousTestCase):
    """
    Properties over generated streams and arbitrary splits into reads.
    """

    @settings(max_examples=300)
    @given(streams=_STREAMS, data=st.data())
    def test_anySplit(self, streams: tuple[bytes, bytes], data: st.DataObject) -> None:
        """
        However a stream of well-formed requests is split into reads, the
        output is the same: each request's Host rewritten, nothing else.
        """
        stream, expected = streams
        whole = HostRewriter(HOST)
        self.assertEqual(whole.feed(stream), expected)
        self.assertIsNone(whole.gave_up)
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
        rewriter = HostRewriter(HOST)
        self.assertEqual(_feed(rewriter, _split(stream, cuts)), expected)
        self.assertIsNone(rewriter.gave_up)
        self.assertFalse(rewriter.passthrough)
        self.assertEqual(rewriter.finish(), b"")

    @given(stream=st.one_of(_mutated(), st.binary(max_size=200)), data=st.data())
    def test_arbitraryBytesAnySplit(self, stream: bytes, data: st.DataObject) -> None:
        """
        For any bytes at all, how they are split into reads does not change
        what is sent once the client has finished.
        """
        whole = HostRewriter(HOST)
        at_once = whole.feed(stream) + whole.finish()
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
        rewriter = HostRewriter(HOST)
        self.assertEqual(
            _feed(rewriter, _split(stream, cuts)) + rewriter.finish(), at_once
        )

    @given(streams=_STREAMS, garbage=st.one_of(_mutated(), st.binary()), data=st.data())
    def test_nothingLostAfterGivingUp(
        self, streams: tuple[bytes, bytes], garbage: bytes, data: st.DataObject
    ) -> None:
        """
        When a stream turns into something that is not a request, every byte
        from there on is passed exactly as sent, however it is split.
        """
        stream, expected = streams
        garbage = b"\x00" + garbage
        cuts = data.draw(st.lists(st.integers(0, len(stream + garbage)), max_size=20))
        rewriter = HostRewriter(HOST)
        out = _feed(rewriter, _split(stream + garbage, cuts)) + rewriter.finish()
        self.assertEqual(out, expected + garbage)

    @given(first=st.binary(min_size=1), later=st.binary())
    def test_passthroughIsIdentity(self, first: bytes, later: bytes) -> None:
        """
        Bytes that cannot start a request come out as they went in, and so
        does everything after them.
        """
        rewriter = HostRewriter(HOST)
        self.assertEqual(rewriter.feed(b"\x16" + first), b"\x16" + first)
        self.assertTrue(rewriter.passthrough)
        self.assertIs(rewriter.feed(later), later)
