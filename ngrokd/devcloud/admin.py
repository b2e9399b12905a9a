# -*- test-case-name: ngrokd.test.test_devcloud_tap -*-
"""
Changing a running devcloud from outside: bound endpoints and faults.

ngrok's own API has no route to bind an endpoint to a local backend, so the
devcloud adds its own, under C{/_devcloud/} on the API server, authenticated
by the same API key (C{Authorization: Bearer KEY}); bodies are JSON:

    GET    /_devcloud/endpoints               {"endpoints": [endpoint, ...]}
    POST   /_devcloud/endpoints               {"url", "backend": "host:port",
                                               "proto"?}  -> 201 endpoint
    DELETE /_devcloud/endpoints?url=URL       204; 404 when URL is not bound
    PUT    /_devcloud/faults/ingress          {"url", "notices"?, "error_code"?,
                                               "error_message"?, "stall"?,
                                               "hang_up"?}  -> 204
    DELETE /_devcloud/faults/ingress?url=URL  204
    POST   /_devcloud/faults/api              {"status"?, "body"?, "delay"?,
                                               "retry_after"?, "count"?,
                                               "path_contains"?}  -> 204
    PATCH  /_devcloud/faults/api              {"page_loop"?, "bindings_enabled"?,
                                               "extra_endpoints"?}  -> 200 switches
    DELETE /_devcloud/faults                  204: every fault cleared

where an endpoint is C{{"id", "url", "proto", "backend": "host:port"}}.
Errors are C{{"status_code", "msg"}} with a 4xx status; the message names the
bad field or value. In-process, the same changes are calls on the L{Cloud}
and the L{IngressFactory}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from ngrokd.devcloud.cloud import Cloud, CloudEndpoint, Faults, InvalidEndpointURL
from ngrokd.devcloud.ingress import (
    FaultError,
    IngressFactory,
    IngressFault,
    format_backend,
)

_JSON = "application/json"


class BadBackend(ValueError):
    """
    A backend address that is not C{host:port}.
    """


class AdminError(Exception):
    """
    An admin request that cannot be served; answered with C{status}.
    """

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


def parse_backend(text: str) -> tuple[str, int]:
    """
    C{host:port} (C{[v6]:port} for IPv6) as a (host, port) pair.

    @raise BadBackend: naming C{text}.
    """
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or any(c.isspace() or c in "/[]" for c in host):
        raise BadBackend(f"{text!r}: a backend must be host:port")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise BadBackend(f"{text!r}: the port must be 1..65535")
    return host, int(port)


def describe_endpoint(endpoint: CloudEndpoint) -> dict[str, str]:
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "proto": endpoint.proto,
        "backend": format_backend(endpoint.backend),
    }


def _field(body: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name, default)
    if value is not default and (
        not isinstance(value, kind) or (kind is int and isinstance(value, bool))
    ):
        raise AdminError(400, f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def _only(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise AdminError(
            400,
            f"unknown field {unknown[0]!r};"
            f" the fields are {', '.join(sorted(allowed))}",
        )


class AdminResource(Resource):
    """
    The C{/_devcloud/} routes (a leaf: it routes on C{request.postpath}).
    """

    isLeaf = True

    def __init__(self, cloud: Cloud, ingress: IngressFactory) -> None:
        Resource.__init__(self)
        self._cloud = cloud
        self._ingress = ingress

    def render(self, request: Request) -> bytes:
        try:
            self._authorize(request)
            status, payload = self._serve(request)
        except AdminError as e:
            status, payload = e.status, {"status_code": e.status, "msg": e.msg}
        request.setResponseCode(status)
        if payload is None:
            return b""
        request.setHeader("Content-Type", _JSON)
        return json.dumps(payload).encode()

    def _authorize(self, request: Request) -> None:
        scheme, _, key = (request.getHeader("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self._cloud.api_keys:
            raise AdminError(403, "the devcloud admin routes need the API key")

    def _serve(self, request: Request) -> tuple[int, dict[str, Any] | None]:
        method = request.method.decode("ascii", "replace")
        path = [p.decode("utf-8", "replace") for p in request.postpath or [] if p]
        match method, path:
            case "GET", ["endpoints"]:
                endpoints = [describe_endpoint(e) for e in self._cloud.endpoints()]
                return 200, {"endpoints": endpoints}
            case "POST", ["endpoints"]:
                return 201, self._add_endpoint(self._body(request))
            case "DELETE", ["endpoints"]:
                url = self._url_argument(request)
                if not any(e.url == url for e in self._cloud.endpoints()):
                    raise AdminError(404, f"{url!r} is not bound")
                self._cloud.remove_endpoint(url)
                return 204, None
            case "PUT", ["faults", "ingress"]:
                self._inject_ingress(self._body(request))
                return 204, None
            case "DELETE", ["faults", "ingress"]:
                self._inject(self._url_argument(request), None)
                return 204, None
            case "POST", ["faults", "api"]:
                self._script_api(self._body(request))
                return 204, None
            case "PATCH", ["faults", "api"]:
                return 200, self._switch_api(self._body(request))
            case "DELETE", ["faults"]:
                self._cloud.faults = Faults()
                self._cloud.bindings_enabled = True
                self._ingress.faults.clear()
                return 204, None
        raise AdminError(404, f"no admin route {method} /_devcloud/{'/'.join(path)}")

    def _body(self, request: Request) -> dict[str, Any]:
        assert request.content is not None
        try:
            body = json.loads(request.content.read() or b"null")
        except ValueError as e:
            raise AdminError(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise AdminError(400, "the body must be a JSON object")
        return body

    def _url_argument(self, request: Request) -> str:
        values = (request.args or {}).get(b"url", [])
        if len(values) != 1:
            raise AdminError(400, "give the endpoint URL once, as ?url=...")
        value: bytes = values[0]
        return value.decode("utf-8", "replace")

    def _add_endpoint(self, body: dict[str, Any]) -> dict[str, str]:
        _only(body, {"url", "backend", "proto"})
        url = _field(body, "url", str, None)
        backend = _field(body, "backend", str, None)
        if url is None or backend is None:
            raise AdminError(400, "an endpoint needs url and backend")
        try:
            endpoint = self._cloud.add_endpoint(
                url, parse_backend(backend), _field(body, "proto", str, None)
            )
        except (InvalidEndpointURL, BadBackend) as e:
            raise AdminError(400, str(e)) from None
        return describe_endpoint(endpoint)

    def _inject_ingress(self, body: dict[str, Any]) -> None:
        _only(
            body, {"url", "notices", "error_code", "error_message", "stall", "hang_up"}
        )
        url = _field(body, "url", str, None)
        if url is None:
            raise AdminError(400, "an ingress fault needs the endpoint url")
        notices = _field(body, "notices", list, [])
        if not all(isinstance(n, str) for n in notices):
            raise AdminError(400, f"notices: expected strings, got {notices!r}")
        try:
            fault = IngressFault(
                notices=tuple(notices),
                error_code=_field(body, "error_code", str, ""),
                error_message=_field(body, "error_message", str, ""),
                stall=_field(body, "stall", bool, False),
                hang_up=_field(body, "hang_up", bool, False),
            )
        except FaultError as e:
            raise AdminError(400, str(e)) from None
        self._inject(url, fault)

    def _inject(self, url: str, fault: IngressFault | None) -> None:
        try:
            self._ingress.inject(url, fault)
        except InvalidEndpointURL as e:
            raise AdminError(400, str(e)) from None

    def _script_api(self, body: dict[str, Any]) -> None:
        _only(
            body,
            {"status", "body", "delay", "retry_after", "count", "path_contains"},
        )
        count = _field(body, "count", int, 1)
        if count < 1:
            raise AdminError(400, f"count: must be at least 1, got {count}")
        path = _field(body, "path_contains", str, "")
        status = _field(body, "status", int, None)
        if status is not None and not 100 <= status <= 599:
            raise AdminError(400, f"status: must be an HTTP status, got {status}")
        delay = body.get("delay")
        if delay is not None and (
            isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0
        ):
            raise AdminError(400, f"delay: a number of seconds, got {delay!r}")
        text = _field(body, "body", str, None)
        faults = self._cloud.faults
        if delay is not None:
            if status is not None or text is not None:
                raise AdminError(400, "delay: give it without status or body")
            faults.next_delay(delay, count, path)
        elif text is not None:
            faults.next_body(text.encode(), status or 200, count, path)
        elif status is not None:
            retry_after = body.get("retry_after")
            if not isinstance(retry_after, int | float | str | None):
                raise AdminError(400, f"retry_after: got {retry_after!r}")
            faults.next_status(status, count, retry_after, path)
        else:
            raise AdminError(400, "give status, body or delay")

    def _switch_api(self, body: dict[str, Any]) -> dict[str, Any]:
        _only(body, {"page_loop", "bindings_enabled", "extra_endpoints"})
        faults = self._cloud.faults
        page_loop = _field(body, "page_loop", bool, faults.page_loop)
        enabled = _field(body, "bindings_enabled", bool, self._cloud.bindings_enabled)
        extra = _field(body, "extra_endpoints", list, faults.extra_endpoints)
        if not all(isinstance(e, dict) for e in extra):
            raise AdminError(400, "extra_endpoints: expected a list of objects")
        faults.page_loop = page_loop
        faults.extra_endpoints = list(extra)
        self._cloud.bindings_enabled = enabled
        return {
            "page_loop": page_loop,
            "bindings_enabled": enabled,
            "extra_endpoints": faults.extra_endpoints,
        }


class DevcloudRoot(Resource):
    """
    The API server's root: C{/_devcloud/...} goes to the admin routes, every
    other path to the ngrok API (a leaf that routes on the whole path).
    """

    def __init__(self, api: Resource, admin: AdminResource) -> None:
        Resource.__init__(self)
        self._api = api
        self._admin = admin

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        return self._admin if path == b"_devcloud" else self._api
