"""
Tests for L{ngrokd.control.web}, L{ngrokd.control.page} and
L{ngrokd.control.history}: the page served by a daemon made by
C{makeService} against the devcloud, read over real HTTP and in headless
Chromium, and its pure parts on their own.
"""

from __future__ import annotations

import json
import os
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.client import Agent

from ngrokd.board import RowIndex
from ngrokd.control.feed import Event
from ngrokd.control.history import ConnectionHistory
from ngrokd.control.page import (
    PageData,
    PageQuery,
    parse_query,
    render_page,
    select,
    sparkline,
)
from ngrokd.control.web import MAX_STREAMS, host_allowed
from ngrokd.status import FAILED, LISTENING, STARTING, EndpointStatus
from ngrokd.test.browser import find_chromium, start_browser
from ngrokd.test.helpers import (
    exchange,
    ready_status,
    wait_until,
)
from ngrokd.test.test_events import Rows
from ngrokd.test.test_health import Answer, DaemonHealthTestCase, http

ECHO = "tcp://echo.test:7000"


async def get(url: str, host: str | None = None, method: bytes = b"GET") -> Answer:
    """
    One request, with C{host} as its C{Host} header when given.
    """
    return await http(url, method, host=host)


class _Lines(Protocol):
    """
    Reads a streamed body, keeping what arrived.
    """

    def __init__(self) -> None:
        self.data = b""
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.ended.callback(None)


def events_in(stream: bytes) -> list[dict[str, Any]]:
    """
    The JSON events of a server-sent event stream.
    """
    return [
        json.loads(line[len(b"data: ") :])
        for line in stream.split(b"\n")
        if line.startswith(b"data: ")
    ]


class PageTests(DaemonHealthTestCase):
    """
    The page at C{/} of the health server.
    """

    def test_rowsAndDaemon(self) -> Deferred[None]:
        """
        The page shows the daemon's version, operator and ingress, and the
        endpoint's row with its URL, local address, state in words and
        counts; it never shows the API key.
        """

        async def run() -> None:
            daemon = await self.start()
            await wait_until(lambda: daemon.daemon_status().ready, "ready")
            port = self.port_of(daemon, ECHO)
            self.assertEqual((await exchange(port, b"hello")).received, b"hello")
            await wait_until(
                lambda: daemon.endpoint_status()[0].connections_open == 0, "close"
            )
            answer = await get(self.url(daemon, "/"))
            self.assertEqual(answer.code, 200)
            self.assertEqual(answer.header("content-type"), "text/html; charset=utf-8")
            page = answer.body.decode()
            status = daemon.daemon_status()
            for text in [
                status.version,
                status.operator_id,
                status.ingress_endpoint,
                ECHO,
                f"127.0.0.1:{port}",
                '<span class="state state-listening">listening</span>',
                "0 / 1",
                "5 B / 5 B",
            ]:
                self.assertIn(text, page)
            self.assertNotIn(self.devcloud.api_key, page)

        return ensureDeferred(run())

    def test_foreignHostRefused(self) -> Deferred[None]:
        """
        A C{Host} that is neither an address, C{localhost} nor a configured
        name (what a DNS-rebinding page sends) gets 403 on every path the
        server has, and on those it has not; the allowed ones get the page.
        """

        async def run() -> None:
            daemon = await self.start()
            port = self.health(daemon).address.rpartition(":")[2]
            children = self.health(daemon).site.resource.children
            paths = ["/" + name.decode() for name in children]
            self.assertLessEqual({"/", "/events", "/status", "/metrics"}, set(paths))
            for path in [*paths, "/static/page.js", "/nothing"]:
                refused = await get(self.url(daemon, path), f"evil.example:{port}")
                self.assertEqual(refused.code, 403, path)
                self.assertIn(b"server.web_hosts", refused.body)
            for host in [f"127.0.0.1:{port}", f"localhost:{port}", "localhost"]:
                self.assertEqual((await get(self.url(daemon, "/"), host)).code, 200)

        return ensureDeferred(run())

    def test_readOnlyAndNoCrossOrigin(self) -> Deferred[None]:
        """
        Other methods get 405; answers carry a Content Security Policy with
        no inline script, forbid framing, and no CORS header.
        """

        async def run() -> None:
            daemon = await self.start()
            for method in [b"POST", b"PUT", b"DELETE"]:
                refused = await get(self.url(daemon, "/"), method=method)
                self.assertEqual(
                    (refused.code, refused.header("allow")), (405, "GET, HEAD")
                )
            answer = await get(self.url(daemon, "/"))
            policy = answer.header("content-security-policy")
            self.assertIn("script-src 'self';", policy)
            self.assertIn("frame-ancestors 'none'", policy)
            self.assertNotIn("unsafe", policy)
            self.assertEqual(answer.header("x-frame-options"), "DENY")
            self.assertEqual(answer.header("access-control-allow-origin"), "")
            self.assertNotRegex(answer.body.decode(), r"<script>|<script [^>]*>[^<]")
            script = await get(self.url(daemon, "/static/page.js"))
            self.assertEqual(
                script.header("content-type"), "text/javascript; charset=utf-8"
            )
            self.assertIn(b"EventSource", script.body)
            self.assertEqual((await get(self.url(daemon, "/static/x.js"))).code, 404)

        return ensureDeferred(run())


class EventStreamTests(DaemonHealthTestCase):
    """
    C{/events}: the feed as server-sent events.
    """

    def test_liveEvent(self) -> Deferred[None]:
        """
        An endpoint added while a stream is open arrives on it as an event
        with the endpoint's URL.
        """

        async def run() -> None:
            daemon = await self.start()
            web = self.health(daemon).web
            response = await Agent(reactor).request(
                b"GET", self.url(daemon, f"/events?after={web.feed.last_id}").encode()
            )
            self.assertEqual(
                response.headers.getRawHeaders("content-type"), ["text/event-stream"]
            )
            body = _Lines()
            response.deliverBody(body)
            self.devcloud.cloud.add_endpoint("tcp://late.test:7001", ("127.0.0.1", 1))
            daemon.discovery.poll_now()
            await wait_until(
                lambda: any(
                    e["kind"] == "added" and e["url"] == "tcp://late.test:7001"
                    for e in events_in(body.data)
                ),
                "the added event",
            )
            web.stop()
            await body.ended
            self.assertEqual(web.streams, set())

        return ensureDeferred(run())

    def test_streamsBounded(self) -> Deferred[None]:
        """
        Past L{MAX_STREAMS} open streams, one more is refused with 503.
        """

        async def run() -> None:
            daemon = await self.start()
            web = self.health(daemon).web
            bodies = []
            for _ in range(MAX_STREAMS):
                response = await Agent(reactor).request(
                    b"GET", self.url(daemon, "/events").encode()
                )
                body = _Lines()
                response.deliverBody(body)
                bodies.append(body)
            await wait_until(lambda: len(web.streams) == MAX_STREAMS, "the streams")
            refused = await get(self.url(daemon, "/events"))
            self.assertEqual(refused.code, 503)
            web.stop()
            for body in bodies:
                await body.ended

        return ensureDeferred(run())


#: A page of a web site whose name was made to resolve to this machine:
#: its script reads what its own origin answers.
REBINDING_PAGE = b"""<!doctype html><title>a web site</title><script>
fetch("/status").then(
    async got => { window.stolen = {code: got.status, body: await got.text()} },
    error => { window.stolen = {code: 0, body: String(error)} })
</script>"""

#: The name resolves to this machine, as after a rebinding. Chromium's
#: Local Network Access asks the user before a web page reaches a local
#: address (headless: no); other browsers, older Chromium and a user who
#: said yes do not stop it, so the test turns it off: the server alone
#: must refuse.
REBINDING_FLAGS = (
    "--host-resolver-rules=MAP rebind.test 127.0.0.1",
    "--disable-features=LocalNetworkAccessChecks",
)


class BrowserTests(DaemonHealthTestCase):
    """
    The page in a real headless Chromium, against a daemon with traffic.
    """

    timeout = 120

    def setUp(self) -> None:
        binary = find_chromium()
        if binary is None:
            raise SkipTest(
                "no chromium binary on PATH (Debian: apt-get install chromium)"
            )
        self.chromium = binary
        super().setUp()

    def test_pageLive(self) -> Deferred[None]:
        """
        Chromium shows the endpoint's row with its state in words and its
        traffic, and an event that happens after the page loaded appears in
        the feed through the live stream.
        """

        async def run() -> None:
            daemon = await self.start()
            await wait_until(lambda: daemon.daemon_status().ready, "ready")
            port = self.port_of(daemon, ECHO)
            for _ in range(3):
                await self.echo_once(port)
            web = self.health(daemon).web
            browser = start_browser(self.chromium, os.path.abspath(self.mktemp()))
            self.addCleanup(lambda: ensureDeferred(browser.close()))
            tab = await browser.open(self.url(daemon, "/"))
            row = await browser.wait_for(
                tab,
                "document.querySelector('#endpoints tbody tr')?.innerText",
                "the endpoint's row",
            )
            self.assertIn(ECHO, row)
            self.assertIn("listening", row)
            self.assertIn("0 / 3", row)
            await browser.wait_for(
                tab,
                "document.getElementById('feed-state').innerText == 'Live.'",
                "the live stream",
            )
            loaded = await browser.evaluate(
                tab, "Number(document.getElementById('events').dataset.last)"
            )
            self.devcloud.cloud.add_endpoint("tcp://late.test:7001", ("127.0.0.1", 1))
            daemon.discovery.poll_now()
            event = await browser.wait_for(
                tab,
                f"""[...document.querySelectorAll('#events li')]
                    .filter(li => Number(li.dataset.id) > {loaded})
                    .map(li => li.innerText)
                    .find(text => text.includes('late.test'))""",
                "a live event",
            )
            self.assertRegex(event, r"^\d\d:\d\d:\d\d added tcp://late.test:7001 added")
            rows = await browser.wait_for(
                tab,
                "document.querySelectorAll('#endpoints tbody tr').length == 2"
                " && document.querySelector('#endpoints').innerText",
                "the new row",
            )
            self.assertIn("tcp://late.test:7001", rows)
            self.assertEqual(len(web.streams), 1)

        return ensureDeferred(run())

    def test_narrowWindow(self) -> Deferred[None]:
        """
        In a window 360 pixels wide nothing is wider than the window, and
        each cell is labelled with its column's name.
        """

        async def run() -> None:
            daemon = await self.start()
            browser = start_browser(self.chromium, os.path.abspath(self.mktemp()))
            self.addCleanup(lambda: ensureDeferred(browser.close()))
            tab = await browser.open(self.url(daemon, "/"), width=360, height=800)
            # Once the page is whole: its stylesheet may come after the row.
            text = await browser.wait_for(
                tab,
                "document.readyState == 'complete'"
                " && document.querySelector('#endpoints tbody tr')?.innerText",
                "the endpoint's row",
            )
            self.assertIn("listening", text)
            label = await browser.evaluate(
                tab,
                "getComputedStyle(document.querySelector("
                "'#endpoints td[data-label=State]'), '::before').content",
            )
            self.assertEqual(label, '"State"')
            width = await browser.evaluate(tab, "document.documentElement.scrollWidth")
            self.assertLessEqual(width, 360)

        return ensureDeferred(run())

    def test_rebindingPageReadsNothing(self) -> Deferred[None]:
        """
        A web page at a name that now resolves to 127.0.0.1 (DNS rebinding)
        and whose script asks its own origin for C{/status} is refused by
        C{Host}: it never reads the operator id.
        """

        async def run() -> None:
            daemon = await self.start()
            await wait_until(lambda: daemon.daemon_status().ready, "ready")
            operator = daemon.daemon_status().operator_id
            self.assertTrue(operator)
            browser = start_browser(
                self.chromium, os.path.abspath(self.mktemp()), REBINDING_FLAGS
            )
            self.addCleanup(lambda: ensureDeferred(browser.close()))
            port = self.health(daemon).address.rpartition(":")[2]
            tab = await browser.open(
                f"http://rebind.test:{port}/", document=REBINDING_PAGE
            )
            stolen = await browser.wait_for(tab, "window.stolen", "the fetch")
            self.assertEqual(stolen["code"], 403, stolen)
            self.assertIn("server.web_hosts", stolen["body"])
            self.assertNotIn(operator, stolen["body"])

        return ensureDeferred(run())

    async def echo_once(self, port: int) -> None:
        client = await exchange(port, b"ping")
        self.assertEqual(client.received, b"ping")


def row(id: str, url: str, state: str = LISTENING, **counts: Any) -> EndpointStatus:
    return EndpointStatus(
        id=id,
        url=url,
        listen_address="127.0.0.1:9080",
        state=state,
        reason="",
        client_address=url.partition("://")[2],
        **counts,
    )


class HostTests(SynchronousTestCase):
    """
    Which C{Host} headers the page answers to.
    """

    def test_allowed(self) -> None:
        """
        IP addresses (with or without a port, IPv6 in brackets),
        C{localhost} and the configured names are allowed.
        """
        for host in [
            b"127.0.0.1",
            b"127.0.0.1:8081",
            b"10.1.2.3:80",
            b"[::1]:8081",
            b"[::1]",
            b"localhost:8081",
            b"LOCALHOST.",
            b"box.lan:8081",
        ]:
            self.assertTrue(host_allowed(host, {"box.lan"}), host)

    def test_refused(self) -> None:
        """
        Any other name, a malformed header, or none is refused.
        """
        for host in [
            None,
            b"",
            b"evil.example",
            b"evil.example:8081",
            b"localhost.evil.example",
            b"127.0.0.1.evil.example",
            b"[evil.example]:80",
            b"[::1]x",
            b"localhost:80:80",
            b"box.lan:x",
        ]:
            self.assertFalse(host_allowed(host, {"box.lan"}), host)


ROWS = tuple(
    row(f"ep_{n:05}", f"tcp://db{n}.prod:5432", FAILED if n % 10 == 0 else LISTENING)
    for n in range(10_000)
)


INDEX = RowIndex.of(ROWS)


class SelectTests(SynchronousTestCase):
    """
    Filtering and paging happen before rendering.
    """

    def test_pages(self) -> None:
        """
        A page holds at most 50 rows; asking beyond the end gives the last.
        """
        first = select(INDEX, PageQuery())
        self.assertEqual(
            (len(first.rows), first.matching, first.pages, first.first),
            (50, 10_000, 200, 1),
        )
        last = select(INDEX, PageQuery(page=999))
        self.assertEqual(
            (last.page, last.first, last.rows[-1].id), (200, 9951, "ep_09999")
        )

    def test_filter(self) -> None:
        """
        The name filter matches the URL, id or local address in any case,
        and combines with the state.
        """
        found = select(INDEX, PageQuery(text="DB123"))
        self.assertEqual(
            [r.url for r in found.rows][:2],
            ["tcp://db123.prod:5432", "tcp://db1230.prod:5432"],
        )
        self.assertEqual(found.matching, 11)
        failed = select(INDEX, PageQuery(text="db12", state=FAILED))
        self.assertEqual(failed.matching, 11)
        self.assertTrue(all(r.state == FAILED for r in failed.rows))

    def test_query(self) -> None:
        """
        A malformed query reads as the defaults, and the filter is bounded.
        """
        self.assertEqual(
            parse_query({b"page": [b"x"], b"state": [b"weird"], b"q": [b"\xff"]}),
            PageQuery(text="\ufffd", state="", page=1),
        )
        self.assertEqual(parse_query({b"page": [b"-3"]}).page, 1)
        self.assertEqual(len(parse_query({b"q": [b"a" * 5000]}).text), 200)
        self.assertEqual(
            parse_query({b"q": [b" db "], b"state": [b"starting"], b"page": [b"2"]}),
            PageQuery("db", STARTING, 2),
        )


class RenderTests(SynchronousTestCase):
    """
    The HTML made from the status values.
    """

    def data(self, rows: tuple[EndpointStatus, ...], **changes: Any) -> PageData:
        query = PageQuery()
        values: dict[str, Any] = dict(
            status=ready_status(),
            query=query,
            selection=select(RowIndex.of(rows), query),
            total=len(rows),
            sparklines={},
            interval=10.0,
            events=[],
            last_event=0,
            upgrade=(None, None),
        )
        return PageData(**(values | changes))

    def test_escaped(self) -> None:
        """
        Text from ngrok or the daemon cannot inject markup.
        """
        hostile = attrs.evolve(
            row("ep_<b>", "http://x.y/<script>alert(1)</script>", FAILED),
            reason='"><img src=x onerror=alert(1)>',
        )
        event = Event(7, 0.0, "failed", "u", "<script>bad()</script>")
        page = render_page(self.data((hostile,), events=[event], last_event=7))
        self.assertNotIn("<script>alert", page)
        self.assertNotIn("<img", page)
        self.assertNotIn("<script>bad", page)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page)

    def test_statesInWords(self) -> None:
        """
        Each state is written out, with its reason.
        """
        rows = (
            attrs.evolve(row("a", "tcp://a.b:1", FAILED), reason="port in use"),
            row("b", "tcp://b.b:1", STARTING),
        )
        page = render_page(self.data(rows))
        self.assertIn(
            'state-failed">failed</span> <span class="reason">port in use', page
        )
        self.assertIn('state-starting">starting</span>', page)

    def test_pager(self) -> None:
        """
        Past one page the pager links the other pages, keeping the filter.
        """
        rows = ROWS[:120]
        query = PageQuery(text="db", page=2)
        page = render_page(
            self.data(rows, query=query, selection=select(RowIndex.of(rows), query))
        )
        self.assertIn("Endpoints 51&ndash;100 of 120", page)
        self.assertIn('href="/?q=db&amp;page=3" rel="next"', page)
        self.assertIn('href="/?q=db&amp;page=1" rel="prev"', page)

    def test_sparkline(self) -> None:
        """
        The sparkline draws the counts, and says them in words.
        """
        line = sparkline([0, 2, 4], 10.0)
        self.assertIn('points="0.0,17.0 45.0,9.0 90.0,1.0"', line)
        self.assertIn(
            'aria-label="connections accepted per 10 s, oldest first: 0 2 4"', line
        )
        self.assertIn("collecting", sparkline([3], 10.0))


class HistoryTests(SynchronousTestCase):
    """
    The bounded history behind the sparklines.
    """

    def test_bounded(self) -> None:
        """
        Each sample keeps the accepted count per endpoint; only the last
        C{keep} are kept, and a removed endpoint is forgotten.
        """
        clock = Clock()
        rows = Rows()
        a, b = row("a", "tcp://a.b:1"), row("b", "tcp://b.b:1")
        history = ConnectionHistory(rows, clock, interval=10, keep=4)
        rows.set(a, b)
        history.startService()
        for total in [1, 3, 6, 10, 15]:
            rows.set(attrs.evolve(a, connections_total=total), b)
            clock.advance(10)
        self.assertEqual(history.accepted("a"), [3, 4, 5])
        self.assertEqual(history.accepted("b"), [0, 0, 0])
        rows.set(a)
        clock.advance(10)
        self.assertEqual(history.accepted("b"), [])
        history.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
