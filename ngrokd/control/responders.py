# -*- test-case-name: ngrokd.test.test_control -*-
"""
What C{ngrokctl}'s AMP commands (L{ngrokd.control.commands}) answer: one
L{ControlCommands} a connection, each command through the daemon's one
L{Controller}, which checks who may change the daemon.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.protocols import amp

from ngrokd import __version__
from ngrokd.control.commands import (
    COMMANDS,
    PROTOCOL_VERSION,
    Events,
    Hello,
    ListEndpoints,
    Reload,
    SetAPIKey,
    Status,
)
from ngrokd.control.controller import Controller
from ngrokd.control.peer import Peer
from ngrokd.status import EndpointStatus

#: The longest a reader may wait for events in one call, in seconds.
MAX_EVENT_WAIT = 30.0


class ControlCommands(amp.CommandLocator):
    """
    The responders of one AMP control connection, for C{peer} (C{None}: it
    cannot be told, and changes are refused).
    """

    def __init__(self, controller: Controller, peer: Peer | None) -> None:
        self._controller = controller
        self._peer = peer
        #: The rows being listed, taken at the first page so that the
        #: pages of one listing agree.
        self._listing: tuple[EndpointStatus, ...] = ()

    @Hello.responder
    def hello(self, version: int) -> dict[str, Any]:
        return {
            "version": PROTOCOL_VERSION,
            "daemon_version": __version__,
            "commands": sorted(COMMANDS),
        }

    @Status.responder
    def status(self) -> dict[str, Any]:
        return {"status": self._controller.status()}

    @ListEndpoints.responder
    def list_endpoints(
        self,
        cursor: int | None = None,
        limit: int | None = None,
        search: str | None = None,
        state: str | None = None,
    ) -> dict[str, Any]:
        cursor = cursor or 0
        limit = limit or 1000
        if cursor == 0 or not self._listing:
            self._listing = self._controller.rows(search or "", state or "")
        rows = self._listing
        page = self._controller.page(rows, cursor, max(1, limit))
        answer: dict[str, Any] = {"endpoints": page}
        end = cursor + len(page)
        if end < len(rows):
            answer["next"] = end
        else:
            self._listing = ()
        return answer

    @Events.responder
    async def events(self, after: int, wait: float | None = None) -> dict[str, Any]:
        feed = self._controller.feed
        found = await feed.wait(after, min(max(wait or 0.0, 0.0), MAX_EVENT_WAIT))
        return {
            "events": [attrs.asdict(event) for event in found],
            "last": feed.last_id,
        }

    @Reload.responder
    async def reload(self) -> dict[str, Any]:
        return await self._controller.reload(self._peer)

    @SetAPIKey.responder
    async def set_api_key(self, key: str) -> dict[str, Any]:
        message = await self._controller.set_api_key(self._peer, key)
        return {"message": message}
