# -*- test-case-name: ngrokd.test.test_control -*-
"""
The Go ngrokd's control protocol, for the scripts written for it: one JSON
object per connection (C{{"command": "status"}}), one JSON line back, then
the daemon closes. Answers keep the original's fields, types and error
texts; every request gets one, a malformed one
C{{"success": false, "error": "failed to decode command: ..."}}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ngrokd.control.commands import CommandFailed, KeyRejected, NotPermitted
from ngrokd.control.controller import Controller
from ngrokd.control.peer import Peer
from ngrokd.endpoints import EndpointURLError, parse_endpoint_url
from ngrokd.status import LISTENING, EndpointStatus

#: The most a request may hold, in bytes.
MAX_LEGACY_REQUEST = 64 * 1024

#: JSON's names for the types a request may hold.
_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class LegacyJSON(Protocol):
    """
    The original's protocol: one JSON object, one JSON line back, close.

    @param turned_away: when not empty, the request is not read: this is
        the answer's error.
    """

    log = Logger()

    def __init__(
        self, controller: Controller, peer: Peer | None, turned_away: str = ""
    ) -> None:
        self._controller = controller
        self._peer = peer
        self._turned_away = turned_away
        self._buffer = b""
        #: A request was read whole (or given up on).
        self._answered = False
        self._replied = False

    @property
    def answers_unread(self) -> bool:
        """
        Whether the answer was written (the connection closes once it is
        read).
        """
        return self._replied

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return
        if self._turned_away:
            self._reply(error=self._turned_away)
            return
        self._buffer += data
        if len(self._buffer) > MAX_LEGACY_REQUEST:
            self._reply(error=f"request longer than {MAX_LEGACY_REQUEST} bytes")
            return
        text = self._buffer.decode("utf-8", "replace")
        try:
            request, _ = json.JSONDecoder().raw_decode(text)
        except RecursionError:
            self._reply(error="failed to decode command: exceeded max depth")
            return
        except ValueError as e:
            if b"\n" in self._buffer:
                self._reply(error=f"failed to decode command: {e}")
            return  # wait for the rest of the object
        self._answered = True
        answering = Deferred.fromCoroutine(self._answer(request))
        answering.addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        self.log.failure("a request of the Go ngrokd's protocol failed", failure)
        self._reply(error="internal error: see the daemon's log")

    async def _answer(self, request: Any) -> None:
        problem = _malformed(request)
        if problem:
            self._reply(error=f"failed to decode command: {problem}")
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
            if not args or not args[0].strip():
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
        if self._replied:
            return
        self._answered = self._replied = True
        answer: dict[str, Any] = {"success": not error}
        if data is not None:
            answer["data"] = data
        if error:
            answer["error"] = error
        assert self.transport is not None
        self.transport.write(json.dumps(answer).encode() + b"\n")
        self.transport.loseConnection()


def _malformed(request: Any) -> str:
    """
    What is wrong with C{request}, as the original's decoder would refuse
    it (C{""}: nothing).
    """
    if not isinstance(request, dict):
        return f"a request must be an object, got {_JSON_TYPES[type(request)]}"
    command = request.get("command", "")
    if not isinstance(command, str):
        return f"command must be a string, got {_JSON_TYPES[type(command)]}"
    args = request.get("args")
    if args is None:
        return ""
    if not isinstance(args, list):
        return f"args must be an array of strings, got {_JSON_TYPES[type(args)]}"
    for arg in args:
        if not isinstance(arg, str):
            return f"args must be an array of strings, got {_JSON_TYPES[type(arg)]}"
    return ""


def _legacy_row(row: EndpointStatus) -> dict[str, Any]:
    """
    An endpoint as the original's C{list} answer has it, with its types: C{ip}
    the address it is reached on in every mode, C{local_listener} whether it
    listens. Ours follow under names the original did not use.
    """
    try:
        target = parse_endpoint_url(row.url)
        host, port = target.host, target.port
    except EndpointURLError:
        host, port = "", 0
    address, _, listen_port = row.listen_address.rpartition(":")
    virtual = row.mode == "virtual"
    reached_on = address if virtual else row.client_address.rpartition(":")[0]
    return {
        "id": row.id,
        "hostname": host,
        "ip": reached_on.strip("[]"),
        "port": port,
        "url": row.url,
        "local_listener": row.state == LISTENING,
        "network_port": 0 if virtual or not listen_port else int(listen_port),
        "listen_interface": row.mode,
        "listen_address": row.listen_address,
        "state": row.state,
        "reason": row.reason,
    }
