# -*- test-case-name: ngrokd.test.test_events -*-
"""
What changed, as events a person can follow: an endpoint added, removed,
failed or recovered, connections failing, the identity and the discovery
poll changing state.

Events are derived by comparing two snapshots of the status values, so the
data path pays nothing for them and a burst of failed connections becomes
one line per endpoint and snapshot ("12 connections failed: ..."), not one
per connection.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import frozen

from ngrokd.status import FAILED, LISTENING, DaemonStatus, EndpointStatus

ADDED = "added"
REMOVED = "removed"
FAILED_EVENT = "failed"
RECOVERED = "recovered"
CONNECTIONS_FAILED = "connections failed"
IDENTITY = "identity"
POLL_FAILING = "poll failing"
POLL_RECOVERED = "poll recovered"

_LAST_FAILURE = "last connection failed: "


@frozen
class Change:
    """
    One thing that changed: its kind, the endpoint URL it is about (C{""}
    for the daemon as a whole), and a sentence saying what happened.
    """

    kind: str
    url: str
    message: str


def endpoint_changes(
    before: Mapping[str, EndpointStatus], after: Mapping[str, EndpointStatus]
) -> list[Change]:
    """
    What changed between two sets of endpoint rows, keyed by endpoint id.
    """
    changes: list[Change] = []
    for id, row in after.items():
        old = before.get(id)
        name = row.url or id
        if old is None:
            where = f": {row.client_address}" if row.client_address else ""
            changes.append(Change(ADDED, row.url, f"{name} added{where}"))
            if row.state == FAILED:
                changes.append(
                    Change(FAILED_EVENT, row.url, f"{name} failed: {row.reason}")
                )
            continue
        if row.state == FAILED and old.state != FAILED:
            changes.append(
                Change(FAILED_EVENT, row.url, f"{name} failed: {row.reason}")
            )
        elif row.state == LISTENING and old.state == FAILED:
            changes.append(
                Change(
                    RECOVERED, row.url, f"{name} listens again on {row.listen_address}"
                )
            )
        failed = row.errors - old.errors
        if failed > 0:
            reason = row.reason.removeprefix(_LAST_FAILURE) or "see the log"
            plural = "connection" if failed == 1 else "connections"
            changes.append(
                Change(
                    CONNECTIONS_FAILED,
                    row.url,
                    f"{failed} {plural} to {name} failed: {reason}",
                )
            )
    for id, old in before.items():
        if id not in after:
            changes.append(Change(REMOVED, old.url, f"{old.url or id} removed"))
    return changes


def daemon_changes(before: DaemonStatus, after: DaemonStatus) -> list[Change]:
    """
    What changed in the daemon as a whole: its identity's state, and
    whether discovery polls fail.
    """
    changes: list[Change] = []
    if after.identity_state != before.identity_state:
        detail = f": {after.identity_error}" if after.identity_error else ""
        changes.append(Change(IDENTITY, "", f"{after.identity_state}{detail}"))
    if after.poll_error and after.poll_error != before.poll_error:
        changes.append(
            Change(POLL_FAILING, "", f"polling the API fails: {after.poll_error}")
        )
    elif before.poll_error and not after.poll_error:
        changes.append(Change(POLL_RECOVERED, "", "polling the API works again"))
    return changes
