# -*- test-case-name: ngrokd.test.test_devcloud_api -*-
"""
The devcloud's HTTP API: ngrok's Kubernetes operator routes over a L{Cloud}.

Only what ngrokd (and ngrok's own operator) use, with ngrok's shapes:

    POST   /kubernetes_operators                       201 the operator
    GET    /kubernetes_operators                       {operators, uri, next_page_uri}
    GET    /kubernetes_operators/{id}                  the operator
    PATCH  /kubernetes_operators/{id}                  the operator
    DELETE /kubernetes_operators/{id}                  204
    GET    /kubernetes_operators/{id}/bound_endpoints  {endpoints, uri, next_page_uri}

Lists take C{limit} and C{before_id}; C{next_page_uri} is absolute, or null
on the last page. Every request needs C{Authorization: Bearer KEY} and
C{Ngrok-Version: 2}. Errors are ngrok's JSON, C{{error_code, status_code,
msg, details: {operation_id}}}, with codes from ngrok's error catalogue and
the statuses its live API answers with:

    403 ERR_NGROK_200    no Authorization header
    403 ERR_NGROK_201    an Authorization header that is not "Bearer ..."
    403 ERR_NGROK_202    a key not accepted; like ngrok, the message quotes
                         the credential back, so clients must not log it raw
    400 ERR_NGROK_210    a body that is not application/json
    400 ERR_NGROK_213    a body that does not parse
    400 ERR_NGROK_214    an unknown (or, here, unsupported) field
    400 ERR_NGROK_215    an invalid value; the message names the field
    400 ERR_NGROK_216    a body without Content-Type
    400 ERR_NGROK_217    Ngrok-Version other than 2
    400 ERR_NGROK_218    no Ngrok-Version
    400 ERR_NGROK_231    an unknown query parameter
    400 ERR_NGROK_232    a query parameter given twice
    400 ERR_NGROK_233    C{limit} outside 1..page size
    400 ERR_NGROK_244    C{limit} not a number
    400 ERR_NGROK_19002  bindings not enabled (account switch, or a create
                         without "bindings" in enabled_features)
    429 ERR_NGROK_226    injected rate limiting
    404 (no code)        unknown operator or path: ngrok's 404s carry no
                         error_code, clients must cope

L{Cloud.faults} scripts misbehaviour (statuses, bodies, delays, page loops).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ngrokd.devcloud.cloud import (
    FEATURES,
    Cloud,
    CloudEndpoint,
    CloudError,
    CloudOperator,
    Injection,
    random_id,
)

_JSON = "application/json"

_CREATE_FIELDS = {
    "description",
    "metadata",
    "enabled_features",
    "region",
    "deployment",
    "binding",
}
_CREATE_BINDING_FIELDS = {"endpoint_selectors", "csr", "ingress_endpoint"}
_DEPLOYMENT_FIELDS = {"name", "namespace", "version", "cluster_name"}
_UPDATE_FIELDS = {"id", "description", "metadata", "binding"}
_UPDATE_BINDING_FIELDS = {"endpoint_selectors", "csr"}
_LIST_PARAMETERS = {"limit", "before_id"}


def rfc3339(when: datetime.datetime) -> str:
    """
    C{when} in UTC as ngrok writes timestamps: C{2025-10-28T12:00:00Z}.
    """
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _invalid(name: str, problem: str) -> CloudError:
    return CloudError(
        400,
        "ERR_NGROK_215",
        f"The value provided for the request parameter {name} is invalid: {problem}",
    )


def _only(obj: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise CloudError(
            400,
            "ERR_NGROK_214",
            f"The request parameter {prefix}{unknown[0]} is unknown and not"
            f" expected. The supported fields are: {', '.join(sorted(allowed))}",
        )


def _object(obj: Mapping[str, Any], key: str, prefix: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, dict):
        raise _invalid(prefix + key, "expected an object")
    return value


def _string(obj: Mapping[str, Any], key: str, prefix: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _invalid(prefix + key, "expected a string")
    return value


def _strings(obj: Mapping[str, Any], key: str, prefix: str) -> list[str] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(prefix + key, "expected a list of strings")
    return value


def _deployment(body: Mapping[str, Any]) -> dict[str, str]:
    deployment = _object(body, "deployment", "") or {}
    _only(deployment, _DEPLOYMENT_FIELDS, "deployment.")
    return {k: _string(deployment, k, "deployment.") or "" for k in _DEPLOYMENT_FIELDS}


def _csr(binding: Mapping[str, Any]) -> bytes | None:
    csr = _string(binding, "csr", "binding.")
    return None if csr is None else csr.encode()


class _APIResource(Resource):
    """
    The whole API as one leaf resource, routing on method and path so that
    every answer, unknown paths included, is ngrok-shaped JSON.
    """

    isLeaf = True

    def __init__(self, cloud: Cloud, base_url: str, clock: IReactorTime | None) -> None:
        Resource.__init__(self)
        self._cloud = cloud
        self._base_url = base_url.rstrip("/")
        self._clock = clock

    def render(self, request: Request) -> bytes | int:
        operation_id = random_id("op")
        injection = self._cloud.faults.take(request.path.decode("utf-8", "replace"))
        if injection is not None and injection.delay:
            if self._clock is None:
                error = CloudError(
                    500, None, "a delay was injected but this devcloud API has no clock"
                )
                return self._send(
                    request, error.status, self._error(error, operation_id)
                )
            call = self._clock.callLater(
                injection.delay, self._answer_late, request, injection, operation_id
            )
            request.notifyFinish().addErrback(self._cancel_late, call)
            return NOT_DONE_YET
        return self._answer(request, injection, operation_id)

    def _answer_late(
        self, request: Request, injection: Injection, operation_id: str
    ) -> None:
        request.write(self._answer(request, injection, operation_id))
        request.finish()

    def _cancel_late(self, reason: Failure, call: IDelayedCall) -> None:
        if call.active():
            call.cancel()

    def _answer(
        self, request: Request, injection: Injection | None, operation_id: str
    ) -> bytes:
        request.setHeader("Ngrok-Operation-Id", operation_id)
        if injection is not None and injection.status is not None:
            if injection.retry_after is not None:
                request.setHeader("Retry-After", injection.retry_after)
            body = injection.body
            if body is None:
                code = "ERR_NGROK_226" if injection.status == 429 else None
                reason = HTTPStatus(injection.status).phrase
                error = CloudError(injection.status, code, f"{reason} (injected)")
                body = self._error(error, operation_id)
            return self._send(request, injection.status, body)
        try:
            status, payload = self._serve(request)
        except CloudError as e:
            return self._send(request, e.status, self._error(e, operation_id))
        if payload is None:
            request.setResponseCode(status)
            return b""
        return self._send(request, status, json.dumps(payload).encode())

    def _send(self, request: Request, status: int, body: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader("Content-Type", _JSON)
        return body

    def _error(self, error: CloudError, operation_id: str) -> bytes:
        payload: dict[str, Any] = {
            "status_code": error.status,
            "msg": error.msg,
            "details": {"operation_id": operation_id},
        }
        if error.error_code is not None:
            payload = {"error_code": error.error_code, **payload}
        return json.dumps(payload).encode()

    # Checks every request passes

    def _check_headers(self, request: Request) -> None:
        header = request.getHeader("Authorization")
        if header is None:
            raise CloudError(
                403,
                "ERR_NGROK_200",
                "The ngrok API requires that you set the Authorization header"
                " for authentication.",
            )
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise CloudError(
                403,
                "ERR_NGROK_201",
                "The ngrok API requires that you use Bearer authentication via"
                f" the Authorization header. Authorization Header: '{header}'.",
            )
        if key.strip() not in self._cloud.api_keys:
            raise CloudError(
                403,
                "ERR_NGROK_202",
                "The API authentication you specified does not look like a valid"
                f" credential. Your credential: '{key.strip()}'.",
            )
        version = request.getHeader("Ngrok-Version")
        if version is None:
            raise CloudError(
                400,
                "ERR_NGROK_218",
                "Your request has not specified an API version. Please include"
                " the version you wish to use in the Ngrok-Version header."
                " Supported versions: 2.",
            )
        if version.strip() != "2":
            raise CloudError(
                400,
                "ERR_NGROK_217",
                f"The provided API version '{version}' is invalid or unsupported."
                " Supported versions: 2.",
            )

    def _body(self, request: Request) -> dict[str, Any]:
        content_type = request.getHeader("Content-Type")
        if content_type is None:
            raise CloudError(
                400,
                "ERR_NGROK_216",
                "You did not provide a Content-Type with your request.",
            )
        if content_type.split(";")[0].strip().lower() != _JSON:
            raise CloudError(
                400,
                "ERR_NGROK_210",
                f"The content type you specified '{content_type}' is not supported"
                " by this API.",
            )
        assert request.content is not None
        try:
            body = json.loads(request.content.read())
        except ValueError as e:
            raise CloudError(
                400,
                "ERR_NGROK_213",
                f"The {_JSON} request body could not be parsed: {e}",
            ) from None
        if not isinstance(body, dict):
            raise CloudError(
                400,
                "ERR_NGROK_213",
                f"The {_JSON} request body could not be parsed: not an object",
            )
        return body

    def _query(self, request: Request, allowed: set[str]) -> dict[str, str]:
        query: dict[str, str] = {}
        for raw, values in (request.args or {}).items():
            name = raw.decode("utf-8", "replace")
            if name not in allowed:
                raise CloudError(
                    400,
                    "ERR_NGROK_231",
                    "The query part of the requested URI includes unknown parameters:"
                    f" {name}. The supported parameters are:"
                    f" {', '.join(sorted(allowed))}.",
                )
            if len(values) != 1:
                raise CloudError(
                    400,
                    "ERR_NGROK_232",
                    f"The request must specify only a single value for the {name}"
                    f" parameter but got {len(values)}.",
                )
            query[name] = values[0].decode("utf-8", "replace")
        return query

    def _limit(self, query: Mapping[str, str]) -> int:
        if "limit" not in query:
            return self._cloud.page_size
        try:
            limit = int(query["limit"])
        except ValueError:
            raise CloudError(
                400,
                "ERR_NGROK_244",
                f"The page size limit must be a number between 1 and"
                f" {self._cloud.page_size} but {query['limit']!r} was provided.",
            ) from None
        if not 1 <= limit <= self._cloud.page_size:
            raise CloudError(
                400,
                "ERR_NGROK_233",
                f"The page size limit must be between 1 and {self._cloud.page_size}"
                f" but {limit} was provided.",
            )
        return limit

    def _base(self, request: Request) -> str:
        if self._base_url:
            return self._base_url
        scheme = "https" if request.isSecure() else "http"
        host = request.getHeader("Host") or "localhost"
        return f"{scheme}://{host}"

    # Routing

    def _serve(self, request: Request) -> tuple[int, dict[str, Any] | None]:
        self._check_headers(request)
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        allowed = (
            _LIST_PARAMETERS
            if path.rstrip("/").endswith(("/kubernetes_operators", "/bound_endpoints"))
            else set()
        )
        query = self._query(request, allowed)
        base = self._base(request)
        match method, [segment for segment in path.split("/") if segment]:
            case "POST", ["kubernetes_operators"]:
                return 201, self._operator(self._create(self._body(request)), base)
            case "GET", ["kubernetes_operators"]:
                return 200, self._operators(request, query, base)
            case "GET", ["kubernetes_operators", operator_id]:
                return 200, self._operator(self._cloud.get_operator(operator_id), base)
            case "PATCH", ["kubernetes_operators", operator_id]:
                operator = self._update(operator_id, self._body(request))
                return 200, self._operator(operator, base)
            case "DELETE", ["kubernetes_operators", operator_id]:
                self._cloud.delete_operator(operator_id)
                return 204, None
            case "GET", ["kubernetes_operators", operator_id, "bound_endpoints"]:
                self._cloud.get_operator(operator_id)
                return 200, self._endpoints(request, query, base)
        raise CloudError(404, None, "Not Found")

    def _create(self, body: dict[str, Any]) -> CloudOperator:
        _only(body, _CREATE_FIELDS, "")
        binding = _object(body, "binding", "") or {}
        _only(binding, _CREATE_BINDING_FIELDS, "binding.")
        features = _strings(body, "enabled_features", "") or []
        for feature in features:
            if feature not in FEATURES:
                raise _invalid("enabled_features", f"unknown feature {feature!r}")
        _string(binding, "ingress_endpoint", "binding.")
        return self._cloud.register(
            description=_string(body, "description", "") or "",
            metadata=_string(body, "metadata", "") or "",
            enabled_features=features,
            region=_string(body, "region", "") or "global",
            deployment=_deployment(body),
            selectors=_strings(binding, "endpoint_selectors", "binding.") or ["true"],
            csr_pem=_csr(binding),
        )

    def _update(self, operator_id: str, body: dict[str, Any]) -> CloudOperator:
        _only(body, _UPDATE_FIELDS, "")
        binding = _object(body, "binding", "") or {}
        _only(binding, _UPDATE_BINDING_FIELDS, "binding.")
        return self._cloud.update(
            operator_id,
            description=_string(body, "description", ""),
            metadata=_string(body, "metadata", ""),
            selectors=_strings(binding, "endpoint_selectors", "binding."),
            csr_pem=_csr(binding),
        )

    # Representations

    def _operator(self, operator: CloudOperator, base: str) -> dict[str, Any]:
        return {
            "id": operator.id,
            "uri": f"{base}/kubernetes_operators/{operator.id}",
            "created_at": rfc3339(operator.created_at),
            "updated_at": rfc3339(operator.updated_at),
            "description": operator.description,
            "metadata": operator.metadata,
            "enabled_features": list(operator.enabled_features),
            "region": operator.region,
            "deployment": operator.deployment,
            "binding": {
                "endpoint_selectors": list(operator.selectors),
                "cert": {
                    "cert": operator.cert.cert_pem.decode("ascii"),
                    "not_before": rfc3339(operator.cert.not_before),
                    "not_after": rfc3339(operator.cert.not_after),
                },
                "ingress_endpoint": self._cloud.ingress_endpoint,
            },
        }

    def _endpoint(self, endpoint: CloudEndpoint, base: str) -> dict[str, Any]:
        created = rfc3339(endpoint.created_at)
        return {
            "id": endpoint.id,
            "region": "global",
            "created_at": created,
            "updated_at": created,
            "public_url": endpoint.url,
            "url": endpoint.url,
            "proto": endpoint.proto,
            "scheme": endpoint.scheme,
            "host": endpoint.host,
            "port": endpoint.port,
            "hostport": f"{endpoint.host}:{endpoint.port}",
            "type": "agent",
            "metadata": "",
            "description": "",
            "bindings": ["kubernetes"],
            "pooling_enabled": False,
            "uri": f"{base}/endpoints/{endpoint.id}",
        }

    def _next_page(
        self, base: str, path: str, query: Mapping[str, str], cursor: str | None
    ) -> str | None:
        if cursor is None:
            return None
        following = {"before_id": cursor}
        if "limit" in query:
            following["limit"] = query["limit"]
        return f"{base}{path}?{urlencode(following)}"

    def _operators(
        self, request: Request, query: Mapping[str, str], base: str
    ) -> dict[str, Any]:
        path = request.path.decode("utf-8", "replace")
        page, cursor = self._cloud.page_operators(
            query.get("before_id"), self._limit(query)
        )
        return {
            "operators": [self._operator(operator, base) for operator in page],
            "uri": f"{base}{path}",
            "next_page_uri": self._next_page(base, path, query, cursor),
        }

    def _endpoints(
        self, request: Request, query: Mapping[str, str], base: str
    ) -> dict[str, Any]:
        path = request.path.decode("utf-8", "replace")
        page, cursor = self._cloud.page_endpoints(
            query.get("before_id"), self._limit(query)
        )
        endpoints: list[dict[str, Any]] = [self._endpoint(e, base) for e in page]
        next_page = self._next_page(base, path, query, cursor)
        if next_page is None:
            endpoints.extend(self._cloud.faults.extra_endpoints)
        if self._cloud.faults.page_loop:
            next_page = base + request.uri.decode("utf-8", "replace")
        return {
            "endpoints": endpoints,
            "uri": f"{base}{path}",
            "next_page_uri": next_page,
        }


def api_resource(
    cloud: Cloud, base_url: str, clock: IReactorTime | None = None
) -> Resource:
    """
    The devcloud API over C{cloud}, to serve at the root of a L{Site}.

    @param base_url: the absolute URL clients reach the root at (C{uri} and
        C{next_page_uri} are built from it); C{""} derives it from each
        request's scheme and C{Host} header.
    @param clock: needed only for injected delays (L{Faults.next_delay}).
    """
    return _APIResource(cloud, base_url, clock)
