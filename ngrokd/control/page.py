# -*- test-case-name: ngrokd.test.test_web -*-
"""
The web page's HTML, made from the status values: pure functions, no I/O.

Endpoints are filtered and paged before anything is rendered, through the
kept rows' indexes, so a page costs the same with ten endpoints or ten
thousand. Every value from the
daemon or ngrok is escaped; states are words, colour only repeats them.
"""

from __future__ import annotations

import datetime
import functools
import html
import string
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Protocol
from urllib.parse import urlencode

from attrs import frozen

from ngrokd.control.feed import Event
from ngrokd.control.history import KEEP
from ngrokd.problems import utc as _utc
from ngrokd.status import FAILED, LISTENING, STARTING, DaemonStatus, EndpointStatus

#: Endpoint rows on one page.
PAGE_SIZE = 50
#: Longest filter text taken from a query.
MAX_FILTER = 200
#: Events shown when the page is rendered; the script adds the next ones.
EVENTS_SHOWN = 30
STATES = (LISTENING, STARTING, FAILED)


@frozen
class PageQuery:
    """
    What the reader asked for: a name filter (a substring of the URL, id or
    local address, any case), a state (C{""}: any), a page number from 1.
    """

    text: str = ""
    state: str = ""
    page: int = 1


def parse_query(args: Mapping[bytes, Sequence[bytes]]) -> PageQuery:
    """
    The query in a request's arguments; anything malformed is read as its
    default, so a hand-edited URL still shows a page.
    """

    def first(name: bytes) -> str:
        values = args.get(name) or [b""]
        return values[0].decode("utf-8", "replace")

    state = first(b"state")
    try:
        page = max(1, int(first(b"page")))
    except ValueError:
        page = 1
    return PageQuery(
        text=first(b"q").strip()[:MAX_FILTER],
        state=state if state in STATES else "",
        page=page,
    )


@frozen
class Selection:
    """
    One page of the rows that match a query.
    """

    rows: tuple[EndpointStatus, ...]
    matching: int
    page: int
    pages: int
    first: int


class IndexedRows(Protocol):
    """
    The kept rows (L{ngrokd.board}), in order, by state, and searchable.
    """

    def __len__(self) -> int: ...
    def keys(self, state: str = "") -> Sequence[tuple[str, str]]: ...
    def matching(self, text: str, state: str = "") -> list[tuple[str, str]]: ...
    def row(self, id: str) -> EndpointStatus | None: ...


def select(rows: IndexedRows, query: PageQuery, size: int = PAGE_SIZE) -> Selection:
    """
    The page of C{rows} that C{query} asks for (the last one when it asks
    beyond the end): the name filter searches the rows' kept text and the
    state is an index, so only the rows shown are read.
    """
    matching: Sequence[tuple[str, str]]
    if query.text:
        matching = rows.matching(query.text, query.state)
    else:
        matching = rows.keys(query.state)
    pages = max(1, -(-len(matching) // size))
    page = min(query.page, pages)
    start = (page - 1) * size
    shown = [rows.row(id) for _, id in matching[start : start + size]]
    return Selection(
        tuple(row for row in shown if row is not None),
        len(matching),
        page,
        pages,
        start + 1,
    )


@frozen
class PageData:
    """
    Everything one rendering of the page shows.

    @ivar sparklines: connections accepted per interval, oldest first, for
        the endpoints shown, by id.
    @ivar upgrade: the median and 99th percentile time to upgrade, in
        seconds, over every endpoint (C{None}: nothing measured).
    """

    status: DaemonStatus
    query: PageQuery
    selection: Selection
    total: int
    sparklines: Mapping[str, Sequence[int]]
    interval: float
    events: Sequence[Event]
    last_event: int
    upgrade: tuple[float | None, float | None]


@functools.cache
def _template() -> string.Template:
    text = (resources.files(__package__) / "static" / "page.html").read_text("utf-8")
    return string.Template(text)


def render_page(data: PageData, nonce: str = "") -> str:
    """
    The whole page.
    """
    status = data.status
    return _template().substitute(
        ready_class="ok" if status.ready else "bad",
        ready=_e("ready" if status.ready else f"not ready: {status.not_ready_because}"),
        now=f"{status.now:.3f}",
        daemon=render_daemon(status, data.upgrade),
        filter=_e(data.query.text),
        state_options=_state_options(data.query.state),
        endpoints=render_endpoints(data),
        last_event=str(data.last_event),
        events="".join(render_event(event) for event in reversed(data.events)),
    )


def render_daemon(
    status: DaemonStatus, upgrade: tuple[float | None, float | None]
) -> str:
    """
    The daemon's facts, as a description list.
    """
    identity = status.identity_state
    if status.identity_error:
        identity += f": {status.identity_error}"
    if status.last_poll is None:
        poll = "never"
    else:
        poll = _ago(status.last_poll, status.now)
    if status.poll_error:
        failures = (
            "1 failure"
            if status.poll_failures == 1
            else (f"{status.poll_failures} failures in a row")
        )
        result = f"failing ({failures}): {_e(status.poll_error)}"
    elif status.polled:
        result = "ok"
    else:
        result = "not yet"
    p50, p99 = upgrade
    if p50 is None or p99 is None:
        timing = "no connection yet"
    else:
        timing = f"p50 {_ms(p50)}, p99 {_ms(p99)} (all endpoints)"
    if status.certificate_expires is None:
        expiry = "no certificate yet"
    else:
        expiry = (
            f"{_until(status.certificate_expires, status.now)}"
            f" ({_e(_utc(status.certificate_expires))})"
        )
    facts = [
        ("Version", _e(status.version)),
        ("Operator", _e(status.operator_id or "not registered")),
        ("Identity", _e(identity)),
        (
            "Ingress",
            f"{_e(status.ingress_endpoint)}, {status.warm_connections} warm",
        ),
        ("Certificate expires", expiry),
        ("Last poll", f"{poll}, {result}"),
        (
            "Listeners",
            f"{status.listeners_up} of {status.listeners_wanted} up,"
            f" {status.endpoints} endpoints",
        ),
        ("Time to upgrade", timing),
        ("Uptime", _since(status.started, status.now)),
        ("IPv6", _ipv6(status)),
    ]
    facts += [
        (
            "Problem",
            f"{_e(p.what)}: {_e(p.error)} ({p.count} times since {_e(_utc(p.since))})",
        )
        for p in status.problems
    ]
    return "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts)


def _ipv6(status: DaemonStatus) -> str:
    if not status.ipv6_subnet:
        return "off"
    if status.ipv6_error:
        return f"unavailable, names are IPv4 only: {_e(status.ipv6_error)}"
    return f"names have addresses in {_e(status.ipv6_subnet)}"


def render_endpoints(data: PageData) -> str:
    """
    The count line, the table of the selected rows, and the pager.
    """
    chosen = data.selection
    if chosen.matching == 0:
        summary = (
            "No endpoint matches."
            if data.total
            else "No endpoints bound to this machine yet."
        )
        return f'<p class="summary">{summary}</p>'
    last = chosen.first + len(chosen.rows) - 1
    summary = (
        f'<p class="summary">Endpoints {chosen.first:,}&ndash;{last:,} of'
        f" {chosen.matching:,}"
        + (
            f" matching ({data.total:,} in all)"
            if chosen.matching != data.total
            else ""
        )
        + "</p>"
    )
    minutes = data.interval * (KEEP - 1) / 60
    head = (
        "<thead><tr><th scope=col>Endpoint</th><th scope=col>Local clients use</th>"
        "<th scope=col>Mode</th><th scope=col>State</th>"
        "<th scope=col>Connections open / total</th>"
        "<th scope=col>Bytes up / down</th><th scope=col>Failed</th>"
        f"<th scope=col>Accepted, last {minutes:g} min</th></tr></thead>"
    )
    body = "".join(
        _row(row, data.sparklines.get(row.id, ()), data.interval) for row in chosen.rows
    )
    return (
        f'{summary}<table id="endpoints">{head}<tbody>{body}</tbody></table>'
        f"{_pager(data.query, chosen)}"
    )


def _row(row: EndpointStatus, counts: Sequence[int], interval: float) -> str:
    cells = [
        (
            "Endpoint",
            f'<span class="url">{_e(row.url or "(no URL)")}</span>'
            f' <span class="id">{_e(row.id)}</span>',
        ),
        (
            "Local clients use",
            f"<code>{_e(row.client_address or '-')}</code>"
            + (
                f' <span class="addresses">{_e(", ".join(row.addresses))}</span>'
                if row.addresses
                else ""
            )
            + (
                f' <span class="reason">IPv6: {_e(row.ipv6_error)}</span>'
                if row.ipv6_error
                else ""
            ),
        ),
        ("Mode", _e(row.mode or "-")),
        (
            "State",
            f'<span class="state state-{_e(row.state)}">{_e(row.state)}</span>'
            + (f' <span class="reason">{_e(row.reason)}</span>' if row.reason else ""),
        ),
        ("Connections", f"{row.connections_open:,} / {row.connections_total:,}"),
        ("Bytes", f"{_size(row.bytes_up)} / {_size(row.bytes_down)}"),
        ("Failed", f"{row.errors:,}"),
        ("Accepted", sparkline(counts, interval)),
    ]
    tds = "".join(f'<td data-label="{label}">{value}</td>' for label, value in cells)
    return f'<tr data-state="{_e(row.state)}">{tds}</tr>'


def sparkline(counts: Sequence[int], interval: float) -> str:
    """
    A small SVG line of C{counts}, labelled with the numbers for readers
    who cannot see it.
    """
    if len(counts) < 2:
        return '<span class="quiet">collecting</span>'
    width, height = 90, 18
    top = max(counts) or 1
    step = width / (len(counts) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 1 - (count / top) * (height - 2):.1f}"
        for i, count in enumerate(counts)
    )
    label = (
        f"connections accepted per {interval:g} s, oldest first:"
        f" {' '.join(str(c) for c in counts)}"
    )
    return (
        f'<svg class="spark" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" role="img" aria-label="{label}">'
        f"<title>{label}</title>"
        f'<polyline points="{points}" fill="none" stroke="currentColor"'
        ' stroke-width="1.5"/></svg>'
    )


def render_event(event: Event) -> str:
    """
    One event of the feed, newest first in the list.
    """
    when = datetime.datetime.fromtimestamp(event.time, datetime.UTC)
    return (
        f'<li data-id="{event.id}"><time datetime="{when.isoformat()}">'
        f"{when:%H:%M:%S}</time> "
        f'<span class="kind">{_e(event.kind)}</span> {_e(event.message)}</li>'
    )


def _pager(query: PageQuery, chosen: Selection) -> str:
    if chosen.pages == 1:
        return ""

    def link(page: int, text: str, rel: str) -> str:
        args = {"q": query.text, "state": query.state, "page": str(page)}
        href = "/?" + urlencode({k: v for k, v in args.items() if v})
        return f'<a href="{_e(href)}" rel="{rel}">{text}</a>'

    parts = []
    if chosen.page > 1:
        parts.append(link(chosen.page - 1, "&larr; previous", "prev"))
    parts.append(f"<span>page {chosen.page:,} of {chosen.pages:,}</span>")
    if chosen.page < chosen.pages:
        parts.append(link(chosen.page + 1, "next &rarr;", "next"))
    return f'<nav class="pager" aria-label="pages">{" ".join(parts)}</nav>'


def _state_options(chosen: str) -> str:
    options = [("", "any")] + [(state, state) for state in STATES]
    return "".join(
        f'<option value="{value}"{" selected" if value == chosen else ""}>'
        f"{text}</option>"
        for value, text in options
    )


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def duration(seconds: float) -> str:
    """
    C{3 d 4 h}, C{2 h 5 min}, C{4 min 10 s}, C{12 s}: the two largest units.
    """
    seconds = max(0, int(seconds))
    units = [("d", 86400), ("h", 3600), ("min", 60), ("s", 1)]
    parts: list[str] = []
    for name, size in units:
        amount, seconds = divmod(seconds, size)
        if amount or parts:
            parts.append(f"{amount} {name}")
        if len(parts) == 2:
            break
    return " ".join(parts) if parts else "0 s"


def _until(when: float, now: float) -> str:
    text = f"in {duration(when - now)}" if when > now else "expired"
    return f'<span data-until="{when:.3f}">{text}</span>'


def _ago(when: float, now: float) -> str:
    return f'<span data-ago="{when:.3f}">{duration(now - when)} ago</span>'


def _since(when: float, now: float) -> str:
    return f'<span data-since="{when:.3f}">{duration(now - when)}</span>'


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


def _size(count: int) -> str:
    """
    C{512 B}, C{1.5 KB}, C{12.3 MB}: powers of 1000, three digits.
    """
    if count < 1000:
        return f"{count} B"
    amount = float(count)
    for unit in ("KB", "MB", "GB"):
        amount /= 1000
        if amount < 1000:
            return f"{amount:.3g} {unit}"
    return f"{amount / 1000:.3g} TB"
