# -*- test-case-name: ngrokd.test.test_control -*-
"""
The Go ngrokd's control protocol, for the scripts written for it: one JSON
object per connection (C{{"command": "status"}}), one JSON line back, then
the daemon closes. Answers keep the original's fields and error texts.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

from ngrokd.control.commands import CommandFailed, KeyRejected, NotPermitted
from ngrokd.control.controller import Controller
from ngrokd.control.peer import Peer
from ngrokd.endpoints import EndpointURLError, parse_endpoint_url
from ngrokd.status import EndpointStatus

#: The most a request may hold, in bytes.
MAX_LEGACY_REQUEST = 64 * 1024


class LegacyJSON(Protocol):
    """
    The original's protocol: one JSON object, one JSON line back, close.
    """

    def __init__(self, controller: Controller, peer: Peer | None) -> None:
        self._controller = controller
        self._peer = peer
        self._buffer = b""
        self._answered = False

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return
        self._buffer += data
        if len(self._buffer) > MAX_LEGACY_REQUEST:
            self._reply(error=f"request longer than {MAX_LEGACY_REQUEST} bytes")
            return
        text = self._buffer.decode("utf-8", "replace")
        try:
            request, _ = json.JSONDecoder().raw_decode(text)
        except ValueError as e:
            if b"\n" in self._buffer:
                self._reply(error=f"failed to decode command: {e}")
            return  # wait for the rest of the object
        self._answered = True
        Deferred.fromCoroutine(self._answer(request))

    async def _answer(self, request: Any) -> None:
        if not isinstance(request, dict):
            self._reply(error="failed to decode command: not a JSON object")
            return
        command = request.get("command")
        args = request.get("args") or []
        if command == "status":
            status = self._controller.status()
            data: dict[str, Any] = {
                "registered": status["registered"],
                "endpoint_count": status["endpoints"],
                "ingress_endpoint": status["ingress_endpoint"],
            }
            if status["operator_id"]:
                data["operator_id"] = status["operator_id"]
            self._reply(data=data)
        elif command == "list":
            self._reply(data=[_legacy_row(row) for row in self._controller.rows()])
        elif command == "set-api-key":
            if not args or not isinstance(args[0], str) or not args[0].strip():
                self._reply(error="API key required")
                return
            try:
                await self._controller.set_api_key(self._peer, args[0])
            except (NotPermitted, KeyRejected, CommandFailed) as e:
                self._reply(error=str(e))
            else:
                self._reply(data="API key set successfully")
        else:
            self._reply(error=f"unknown command: {command}")

    def _reply(self, data: Any = None, error: str = "") -> None:
        self._answered = True
        answer: dict[str, Any] = {"success": not error}
        if data is not None:
            answer["data"] = data
        if error:
            answer["error"] = error
        assert self.transport is not None
        self.transport.write(json.dumps(answer).encode() + b"\n")
        self.transport.loseConnection()


def _legacy_row(row: EndpointStatus) -> dict[str, Any]:
    """
    An endpoint as the original's C{list} answer has it.
    """
    try:
        target = parse_endpoint_url(row.url)
        host, port = target.host, target.port
    except EndpointURLError:
        host, port = "", 0
    address, _, listen_port = row.listen_address.rpartition(":")
    virtual = row.mode == "virtual"
    return {
        "id": row.id,
        "hostname": host,
        "ip": address.strip("[]") if virtual else "",
        "port": port,
        "url": row.url,
        "local_listener": row.listen_address,
        "network_port": 0 if virtual or not listen_port else int(listen_port),
        "listen_interface": row.mode,
    }
