# -*- test-case-name: ngrokd.test.test_api -*-
"""
Reading ngrok's answers: the body (bounded), the operator and endpoint
records in it, and an error answer as an L{APIError}. Kept apart from the
client (L{ngrokd.ngrok.api}), which does the requests, so that what an
answer may hold is read in one place.

An answer is input we do not control, so everything read from it is
bounded: the size of a body (L{MAX_BODY}), the length of each string
(L{MAX_STRING}, certificates L{MAX_PEM}). An answer beyond one of them is
an L{APIResponseInvalid} naming the limit; nothing of it is used.
"""

from __future__ import annotations

import datetime
import email.utils
import json
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol as BodyProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from ngrokd.ngrok.apierrors import APIError, APIResponseInvalid, redact

#: The largest body read from the API, in bytes: a page of 100 endpoints is
#: tens of kilobytes.
MAX_BODY = 4 * 1024 * 1024
#: The longest string taken from an answer (ids, URLs, error messages...).
MAX_STRING = 4096
#: The longest certificate (PEM, with its chain) taken from an answer.
MAX_PEM = 65536


@frozen
class Operator:
    """
    ngrok's record of this ngrokd: its id and binding certificate (PEM,
    possibly followed by its chain), where to reach the binding ingress, and
    the endpoint selectors it was registered with.
    """

    id: str
    cert_pem: bytes
    not_before: datetime.datetime
    not_after: datetime.datetime
    ingress_endpoint: str
    selectors: tuple[str, ...]


@frozen
class ApiEndpoint:
    """
    A bound endpoint as the API lists it; C{url} is kept as ngrok sent it
    (C{url}, or the deprecated C{public_url}) for the endpoint parser.
    """

    id: str
    url: str
    proto: str


class Fields:
    """
    Typed access into a decoded JSON document, naming the field in errors.
    """

    def __init__(self, url: str, document: Any, path: str = "") -> None:
        self._url = url
        self._document = document
        self._path = path

    def _invalid(self, name: str, problem: str) -> APIResponseInvalid:
        return APIResponseInvalid(self._url, self._path + name, problem)

    def _value(self, name: str, required: bool) -> Any:
        if not isinstance(self._document, dict):
            where = self._path.rstrip(".") or "body"
            raise APIResponseInvalid(self._url, where, "not an object")
        if required and self._document.get(name) is None:
            raise self._invalid(name, "missing")
        return self._document.get(name)

    def child(self, name: str) -> Fields:
        value = self._value(name, True)
        if not isinstance(value, dict):
            raise self._invalid(name, "not an object")
        return Fields(self._url, value, f"{self._path}{name}.")

    def string(self, name: str, required: bool = True, limit: int = MAX_STRING) -> str:
        value = self._value(name, required)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self._invalid(name, f"not a string: {type(value).__name__}")
        if required and not value:
            raise self._invalid(name, "empty")
        if len(value) > limit:
            raise self._invalid(name, f"longer than {limit} characters ({len(value)})")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self._value(name, False)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._invalid(name, "not a list of strings")
        for i, item in enumerate(value):
            if len(item) > MAX_STRING:
                raise self._invalid(
                    f"{name}[{i}]", f"longer than {MAX_STRING} characters ({len(item)})"
                )
        return tuple(value)

    def time(self, name: str) -> datetime.datetime:
        text = self.string(name)
        try:
            when = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise self._invalid(name, f"not an RFC 3339 time: {text!r}") from None
        if when.tzinfo is None:
            raise self._invalid(name, f"no UTC offset: {text!r}")
        return when

    def items(self, name: str) -> list[Fields]:
        value = self._value(name, False)
        if not isinstance(value, list):
            raise self._invalid(name, "not a list")
        return [
            Fields(self._url, item, f"{self._path}{name}[{i}].")
            for i, item in enumerate(value)
        ]


def parse_operator(fields: Fields) -> Operator:
    binding = fields.child("binding")
    cert = binding.child("cert")
    return Operator(
        id=fields.string("id"),
        cert_pem=cert.string("cert", limit=MAX_PEM).encode("ascii", "replace"),
        not_before=cert.time("not_before"),
        not_after=cert.time("not_after"),
        ingress_endpoint=binding.string("ingress_endpoint", required=False),
        selectors=binding.strings("endpoint_selectors"),
    )


def parse_endpoint(fields: Fields) -> ApiEndpoint:
    url = fields.string("url", required=False) or fields.string("public_url")
    return ApiEndpoint(
        id=fields.string("id"), url=url, proto=fields.string("proto", required=False)
    )


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """
    A C{Retry-After} header (seconds, or an HTTP date) as seconds from
    C{now} (POSIX time); C{None} when absent or unreadable.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class _BoundedBody(BodyProtocol):
    """
    Collects a response body up to L{MAX_BODY} bytes. A longer one, or a
    cancel, aborts the response (closing its connection), so that no body
    goes on arriving after its reader gave up.
    """

    transport: Any

    def __init__(self, url: str, finished: Deferred[bytes]) -> None:
        self._url = url
        self._finished: Deferred[bytes] | None = finished
        self._chunks: list[bytes] = []
        self._size = 0

    def abort(self) -> None:
        self._finished = None
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        finished = self._finished
        if finished is None:
            return
        self._size += len(data)
        if self._size > MAX_BODY:
            self.abort()
            finished.errback(
                APIResponseInvalid(self._url, "body", f"larger than {MAX_BODY} bytes")
            )
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        finished, self._finished = self._finished, None
        if finished is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(b"".join(self._chunks))
        else:
            finished.errback(reason)


def read_body(response: IResponse, url: str) -> Deferred[bytes]:
    """
    The body of C{response}, refused as soon as it proves longer than
    L{MAX_BODY}; cancelling the read aborts the response.
    """
    reading: Deferred[bytes] = Deferred(lambda _: body.abort())
    body = _BoundedBody(url, reading)
    response.deliverBody(body)
    return reading


def api_error(
    response: IResponse, raw: bytes, request: str, key: str, now: float
) -> APIError:
    """
    The L{APIError} of an error answer (C{response}, its body C{raw}) to
    C{request}, at C{now} (POSIX time, for a C{Retry-After} date), without
    the API key C{key}.
    """
    status: int = response.code
    retry_after = None
    if status in (429, 503):
        values = response.headers.getRawHeaders("Retry-After") or [None]
        retry_after = retry_after_seconds(values[0], now)
    header_id = (response.headers.getRawHeaders("Ngrok-Operation-Id") or [None])[0]
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        text = raw.decode("utf-8", "replace").strip()[:200]
        message = text or response.phrase.decode("ascii", "replace")
        return APIError(
            status, None, redact(message, key), header_id, retry_after, request
        )
    details = document.get("details")
    operation_id = details.get("operation_id") if isinstance(details, dict) else None
    code = document.get("error_code")
    return APIError(
        status,
        code if isinstance(code, str) and code else None,
        redact(str(document.get("msg") or ""), key),
        operation_id if isinstance(operation_id, str) else header_id,
        retry_after,
        request,
    )
