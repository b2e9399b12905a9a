# -*- test-case-name: ngrokd.test.test_ctl,ngrokd.test.test_hops -*-
"""
C{ngrokctl}'s human output, as pure functions of the daemon's answers
(and of C{diagnose}'s checks).

States are words (C{listening}, C{failed}, C{starting}), coloured only when
asked (on a terminal), so the output reads the same without colour and
parses with C{awk}: C{Endpoints:} keeps the original's C{awk '{print $2}'}.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from ngrokd.control.verdict import FAIL, Check, first_broken

_COLOURS = {"listening": "32", "failed": "31", "starting": "33"}


def _paint(text: str, state: str, colour: bool) -> str:
    code = _COLOURS.get(state)
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text


def duration(seconds: float) -> str:
    """
    C{3d 4h}, C{2h 5m}, C{4m 10s}, C{12s}: the two largest units.
    """
    seconds = int(max(0, seconds))
    units = [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)]
    parts: list[str] = []
    for name, size in units:
        if seconds >= size or (name == "s" and not parts):
            parts.append(f"{seconds // size}{name}")
            seconds %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def size(count: int) -> str:
    """
    Bytes in the largest unit that keeps a number below 1,024.
    """
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _when(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def status_lines(
    status: Mapping[str, Any], counts: Mapping[str, int], colour: bool = False
) -> list[str]:
    """
    C{ngrokctl status}: the daemon in a few labelled lines.

    @param counts: endpoints by state.
    """
    now = status["now"]
    lines = [f"ngrokd {status['version']}, up {duration(status['uptime'])}"]
    if status["registered"]:
        lines.append(f"Registered:   yes, operator {status['operator_id']}")
    else:
        lines.append(f"Registered:   no ({status['identity_state']})")
    if status["identity_error"]:
        lines.append(f"Problem:      {status['identity_error']}")
    expires = status["certificate_expires"]
    if expires is not None:
        left = expires - now
        when = "expired" if left <= 0 else f"in {duration(left)}"
        lines.append(f"Certificate:  expires {_when(expires)} ({when})")
    warm = status.get("warm_connections", 0)
    lines.append(
        f"Ingress:      {status['ingress_endpoint']}"
        + (f", {warm} warm connection{'' if warm == 1 else 's'} ready" if warm else "")
    )
    if status.get("stale"):
        lines.append(
            "Stale:        serving the endpoints kept from an earlier run until"
            " the API answers"
        )
    if status["poll_error"]:
        failures = status["poll_failures"]
        lines.append(
            f"Last poll:    failing ({failures} in a row): {status['poll_error']}"
        )
    elif status["last_poll"] is not None:
        lines.append(f"Last poll:    ok, {duration(now - status['last_poll'])} ago")
    else:
        lines.append("Last poll:    none yet")
    by_state = ", ".join(
        _paint(f"{n} {state}", state, colour) for state, n in sorted(counts.items())
    )
    total = sum(counts.values())
    lines.append(f"Endpoints:    {total}" + (f" ({by_state})" if by_state else ""))
    if status.get("names_via"):
        fallback = status.get("names_fallback")
        lines.append(
            f"Names:        through {status['names_via']}"
            + (f", because {fallback}" if fallback else "")
        )
    if status.get("config_error"):
        lines.append(f"Config:       reload refused: {status['config_error']}")
    if status.get("restart_pending"):
        pending = ", ".join(status["restart_pending"])
        lines.append(f"Config:       {pending} changed: restart ngrokd to apply")
    for problem in status.get("problems", ()):
        lines.append(
            f"Problem:      {problem['what']}: {problem['error']} (failing since"
            f" {_when(problem['since'])}, {problem['count']} times)"
        )
    if status.get("ipv6_error"):
        lines.append(
            f"IPv6:         unavailable, names are IPv4 only: {status['ipv6_error']}"
        )
    elif status.get("ipv6_subnet"):
        lines.append(f"IPv6:         names have addresses in {status['ipv6_subnet']}")
    ready = "yes" if status["ready"] else f"no, {status['not_ready_because']}"
    lines.append(f"Ready:        {ready}")
    if total == 0 and status["registered"]:
        lines.append(
            "No endpoint is bound to this machine yet: bind one in ngrok (a"
            " Kubernetes-bound endpoint) and it appears here at the next poll."
        )
    return lines


_COLUMNS = (
    "URL",
    "CONNECT TO",
    "MODE",
    "STATE",
    "CONNS",
    "ERRORS",
    "UP",
    "DOWN",
    "ADDRESSES",
)


def endpoint_table(
    rows: Sequence[Mapping[str, Any]], colour: bool = False, filtered: bool = False
) -> list[str]:
    """
    C{ngrokctl list}: one aligned row per endpoint, then the reasons of
    those that are not fine, then the total.

    @param filtered: C{rows} are those a filter kept, not every endpoint.
    """
    if not rows and filtered:
        return ["No endpoint matches."]
    if not rows:
        return [
            "No bound endpoints.",
            "Bind an endpoint to this machine in ngrok; it appears at the next poll.",
        ]
    table = [list(_COLUMNS)]
    states: list[str] = [""]
    for row in rows:
        table.append(
            [
                row["url"] or f"({row['id']})",
                row["client_address"] or row["listen_address"] or "-",
                row["mode"] or "-",
                row["state"],
                f"{row['connections_open']}/{row['connections_total']}",
                str(row["errors"]),
                size(row["bytes_up"]),
                size(row["bytes_down"]),
                ",".join(row.get("addresses", ())) or "-",
            ]
        )
        states.append(row["state"])
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = []
    for line, state in zip(table, states, strict=True):
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        cells[3] = _paint(cells[3], state, colour)
        lines.append("  ".join(cells).rstrip())
    notes = [
        f"  {row['url'] or row['id']}: {row['reason']}" for row in rows if row["reason"]
    ] + [
        f"  {row['url']}: not on IPv6: {row['ipv6_error']}"
        for row in rows
        if row.get("ipv6_error")
    ]
    if notes:
        lines += ["", "Reasons:", *notes]
    plural = "endpoint" if len(rows) == 1 else "endpoints"
    lines += ["", f"Total: {len(rows)} {plural}"]
    return lines


def endpoint_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """
    Each endpoint's hostname once, in the rows' order: what a shell offers
    to complete C{ngrokctl list TEXT}.
    """
    names: dict[str, None] = {}
    for row in rows:
        host = urlsplit(row["url"]).hostname
        if host:
            names[host] = None
    return list(names)


def event_line(event: Mapping[str, Any], colour: bool = False) -> str:
    """
    C{ngrokctl events}: a timestamped line per event.
    """
    moment = datetime.datetime.fromtimestamp(event["time"], datetime.UTC)
    state = {"failed": "failed", "recovered": "listening", "added": "listening"}.get(
        event["kind"], ""
    )
    kind = _paint(event["kind"], state, colour)
    return f"{moment:%H:%M:%S} {kind}: {event['message']}"


def check_lines(checks: Sequence[Check]) -> list[str]:
    """
    C{ngrokctl diagnose}: the checks, a line each, its hint below a failed
    one, then the verdict.
    """
    lines = []
    for check in checks:
        detail = f": {check.detail}" if check.detail else ""
        lines.append(f"{check.state.upper():4}  {check.name}{detail}")
        if check.hint and check.state == FAIL:
            lines.append(f"      hint: {check.hint}")
    broken = first_broken(checks)
    lines.append(f"first broken hop: {broken.name}" if broken else "every check passed")
    return lines
