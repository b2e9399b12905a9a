# -*- test-case-name: ngrokd.test.test_api -*-
"""
ngrokd's client for ngrok's API: registering the operator, renewing its
certificate, and listing the endpoints bound to it.

Every failure is one of four kinds a caller can act on: L{APIError} (ngrok
answered with an error status), L{APIUnavailable} (no answer: refused,
timed out, TLS failed), L{APIResponseInvalid} (an answer that is not what
ngrok's API promises), L{NoAPIKey}. None of their messages ever contains
the API key, even where ngrok quotes it back (it does, for a wrong key).

The key is read from a callable for every request, so a key set at run time
takes effect at once. Timeouts use the given clock, not treq's (which uses
the global reactor).

An answer is input we do not control, so everything read from it is
bounded: the size of a body (L{MAX_BODY}), the length of each string
(L{MAX_STRING}, certificates L{MAX_PEM}), the number of items in a listing,
and the time a whole listing may take. An answer beyond one of them is an
L{APIResponseInvalid} (or L{APIUnavailable} for the time) naming the limit;
nothing of it is used.
"""

from __future__ import annotations

import datetime
import email.utils
import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from attrs import frozen
from OpenSSL.SSL import Error as TLSError
from treq.client import HTTPClient
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    succeed,
)
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    DNSLookupError,
)
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol as BodyProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IPolicyForHTTPS, IResponse

from ngrokd import __version__

_log = Logger()

T = TypeVar("T")

#: Per error code, what it means for ngrokd and what to do.
_HINTS = {
    "ERR_NGROK_19002": (
        "the ngrok account of this API key does not have the Kubernetes"
        " Operators and Bindings feature that ngrokd needs; ask ngrok to"
        " enable it for the account, or use an API key of an account that has it"
    ),
    "ERR_NGROK_200": "no API key was sent",
    "ERR_NGROK_202": "the API key is not valid; check api.key or NGROK_API_KEY",
    "ERR_NGROK_203": "the API key is not valid; check api.key or NGROK_API_KEY",
}

_REDACTED = "[redacted]"

#: The largest body read from the API, in bytes: a page of 100 endpoints is
#: tens of kilobytes.
MAX_BODY = 4 * 1024 * 1024
#: The longest string taken from an answer (ids, URLs, error messages...).
MAX_STRING = 4096
#: The longest certificate (PEM, with its chain) taken from an answer.
MAX_PEM = 65536
#: The default limits of one listing: how many items, and how many seconds.
MAX_ITEMS = 10000
LISTING_TIMEOUT = 120.0


def _redact(text: str, key: str) -> str:
    return text.replace(key, _REDACTED) if key else text


class NoAPIKey(Exception):
    """
    There is no API key to call ngrok's API with.
    """

    def __str__(self) -> str:
        return (
            "no ngrok API key: set api.key in the config, NGROK_API_KEY in the"
            " environment, or run ngrokctl set-api-key"
        )


class APIError(Exception):
    """
    ngrok answered with an error: HTTP C{status}, ngrok's C{error_code} (not
    every error has one), its message, its operation id (what ngrok's support
    asks for), for 429/503 the C{Retry-After} delay in seconds if given, and
    the C{request} it answered (C{"GET /kubernetes_operators/..."}).
    """

    def __init__(
        self,
        status: int,
        error_code: str | None,
        message: str,
        operation_id: str | None,
        retry_after: float | None = None,
        request: str = "",
    ) -> None:
        super().__init__(status, error_code, message, operation_id)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.operation_id = operation_id
        self.retry_after = retry_after
        self.request = request

    def __str__(self) -> str:
        text = f"ngrok API error {self.status}"
        if self.request:
            text += f" for {self.request}"
        if self.error_code:
            text += f" {self.error_code}"
        text += f": {self.message}"
        hint = _HINTS.get(self.error_code or "")
        if hint:
            text += f" ({hint})"
        if self.retry_after is not None:
            text += f"; retry after {self.retry_after:g}s"
        if self.operation_id:
            text += f" [operation {self.operation_id}]"
        return text


def failure_kind(error: BaseException | None) -> str:
    """
    What identifies a failure for "log it once": ngrok's status and error
    code for an API error (its message and operation id differ at every
    request), the message otherwise.
    """
    if isinstance(error, APIError):
        return f"{error.status} {error.error_code or ''}"
    return f"{type(error).__name__}: {error}"


class APIUnavailable(Exception):
    """
    No answer from ngrok's API at C{url}: connection refused, name not
    found, timeout, TLS failure (untrusted certificate...), dropped connection.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, reason)
        self.url = url
        self.reason = reason

    def __str__(self) -> str:
        return f"ngrok API at {self.url} unavailable: {self.reason}"


class APIResponseInvalid(Exception):
    """
    The answer from C{url} is not what ngrok's API promises: C{field} (a
    dotted path into the JSON, or "body") is C{problem}.
    """

    def __init__(self, url: str, field: str, problem: str) -> None:
        super().__init__(url, field, problem)
        self.url = url
        self.field = field
        self.problem = problem

    def __str__(self) -> str:
        return (
            f"invalid ngrok API response from {self.url}: {self.field}: {self.problem}"
        )


class PaginationError(APIResponseInvalid):
    """
    Following C{next_page_uri} does not end: a page names one already read,
    or there are more pages than any account should have.
    """


#: The failures an API call is expected to have; any other is a fault in
#: ngrokd, to be logged with its traceback.
EXPECTED_FAILURES = (APIError, APIUnavailable, APIResponseInvalid, NoAPIKey)


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


class HTTPRequester(Protocol):
    """
    The part of L{treq.client.HTTPClient} used here (L{treq.testing.StubTreq}
    provides it too).
    """

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Any = ...,
        data: Any = ...,
        allow_redirects: bool = ...,
    ) -> Deferred[Any]: ...


class _Fields:
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

    def child(self, name: str) -> _Fields:
        value = self._value(name, True)
        if not isinstance(value, dict):
            raise self._invalid(name, "not an object")
        return _Fields(self._url, value, f"{self._path}{name}.")

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

    def items(self, name: str) -> list[_Fields]:
        value = self._value(name, False)
        if not isinstance(value, list):
            raise self._invalid(name, "not a list")
        return [
            _Fields(self._url, item, f"{self._path}{name}[{i}].")
            for i, item in enumerate(value)
        ]


def _operator(fields: _Fields) -> Operator:
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


def _endpoint(fields: _Fields) -> ApiEndpoint:
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


def _failure_reason(failure: Failure) -> str:
    error = failure.value
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, ResponseFailed | RequestTransmissionFailed):
        return "; ".join(_failure_reason(reason) for reason in error.reasons)
    if isinstance(error, TLSError):
        return f"TLS failed: {error}"
    return failure.getErrorMessage() or type(error).__name__


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


def _read_body(response: IResponse, url: str) -> Deferred[bytes]:
    """
    The body of C{response}, refused as soon as it proves longer than
    L{MAX_BODY}; cancelling the read aborts the response.
    """
    reading: Deferred[bytes] = Deferred(lambda _: body.abort())
    body = _BoundedBody(url, reading)
    response.deliverBody(body)
    return reading


class NgrokAPI:
    """
    ngrok's API at C{base_url}, authenticated with the key C{key_provider}
    returns at each request.

    @param http: a treq C{HTTPClient} (or C{StubTreq}).
    @param clock: times out each request after C{timeout} seconds, and
        each listing after C{listing_timeout}.
    @param max_pages: more pages than this in one listing is an error.
    @param max_items: more items than this in one listing is an error.
    @param pool: the connection pool to close in L{close}, if any.
    @param on_answer: called after every successful answer: the API is
        reachable (so that work waiting for it need not wait out a backoff).
    """

    def __init__(
        self,
        base_url: str,
        key_provider: Callable[[], str],
        http: HTTPRequester,
        clock: IReactorTime,
        timeout: float = 30.0,
        max_pages: int = 1000,
        pool: HTTPConnectionPool | None = None,
        max_items: int = MAX_ITEMS,
        listing_timeout: float = LISTING_TIMEOUT,
        on_answer: Callable[[], object] = lambda: None,
    ) -> None:
        self._on_answer = on_answer
        self._base_url = base_url.rstrip("/")
        self._key_provider = key_provider
        self._http = http
        self._clock = clock
        self._timeout = timeout
        self._max_pages = max_pages
        self._pool = pool
        self._max_items = max_items
        self._listing_timeout = listing_timeout

    def close(self) -> Deferred[None]:
        """
        Close the connections kept open for later requests.
        """
        if self._pool is None:
            return succeed(None)
        closing: Deferred[None] = self._pool.closeCachedConnections()
        return closing

    def _operator_url(self, operator_id: str) -> str:
        if not operator_id.strip():
            raise ValueError("the operator id is empty")
        return f"{self._base_url}/kubernetes_operators/{quote(operator_id, safe='')}"

    # Operators

    def register(
        self,
        description: str,
        metadata: str,
        selectors: Sequence[str],
        region: str,
        csr_pem: bytes,
    ) -> Deferred[Operator]:
        """
        Create this ngrokd's operator with the bindings feature; C{metadata}
        is a string (ngrok stores it as given; by convention JSON).
        """
        body = {
            "description": description,
            "metadata": metadata,
            "enabled_features": ["bindings"],
            "region": region,
            "binding": {
                "endpoint_selectors": list(selectors),
                "csr": csr_pem.decode("ascii"),
            },
        }
        url = f"{self._base_url}/kubernetes_operators"
        return self._request("POST", url, body).addCallback(self._parse_operator, url)

    def renew(
        self, operator_id: str, csr_pem: bytes, selectors: Sequence[str]
    ) -> Deferred[Operator]:
        """
        Ask for a certificate for a new key's CSR (ngrok returns the old
        certificate for a CSR it has seen), updating the selectors too.
        """
        url = self._operator_url(operator_id)
        body = {
            "binding": {
                "endpoint_selectors": list(selectors),
                "csr": csr_pem.decode("ascii"),
            }
        }
        return self._request("PATCH", url, body).addCallback(self._parse_operator, url)

    def get_operator(self, operator_id: str) -> Deferred[Operator]:
        url = self._operator_url(operator_id)
        return self._request("GET", url).addCallback(self._parse_operator, url)

    def operators(self) -> Deferred[list[Operator]]:
        """
        Every operator of the account (to find one whose id was lost).
        """
        url = f"{self._base_url}/kubernetes_operators"
        return self._listing(url, "operators", _operator)

    def bound_endpoints(self, operator_id: str) -> Deferred[list[ApiEndpoint]]:
        """
        Every endpoint bound to the operator, following C{next_page_uri}
        until it is null or a page is empty.
        """
        url = self._operator_url(operator_id) + "/bound_endpoints"
        return self._listing(url, "endpoints", _endpoint)

    def _parse_operator(self, document: Any, url: str) -> Operator:
        return _operator(_Fields(url, document))

    # Mechanics

    def _listing(
        self, url: str, name: str, parse: Callable[[_Fields], T]
    ) -> Deferred[list[T]]:
        """
        Every item of a paged listing, within the listing's time limit.
        """
        listing = Deferred.fromCoroutine(self._list(url, name, parse))
        listing.addTimeout(self._listing_timeout, self._clock)

        def too_slow(failure: Failure) -> Failure:
            failure.trap(TimeoutError)
            raise APIUnavailable(
                url,
                f"the listing of {name} did not end within {self._listing_timeout:g}s",
            )

        return listing.addErrback(too_slow)

    async def _list(
        self, url: str, name: str, parse: Callable[[_Fields], T]
    ) -> list[T]:
        found: list[T] = []
        seen: set[str] = set()
        next_url: str | None = url
        while next_url is not None:
            if next_url in seen:
                raise PaginationError(
                    next_url, "next_page_uri", "names a page already read (a loop)"
                )
            if len(seen) >= self._max_pages:
                raise PaginationError(
                    next_url, "next_page_uri", f"more than {self._max_pages} pages"
                )
            seen.add(next_url)
            page = _Fields(next_url, await self._request("GET", next_url))
            items = page.items(name)
            if not items:
                break
            found.extend(parse(item) for item in items)
            if len(found) > self._max_items:
                raise APIResponseInvalid(
                    url, name, f"more than {self._max_items} {name} in one listing"
                )
            following = page.string("next_page_uri", required=False)
            next_url = self._follow(next_url, following) if following else None
        return found

    def _follow(self, current: str, following: str) -> str:
        """
        The next page's URL; it must stay on the API's origin, since the
        API key goes with it.
        """
        target = urljoin(current, following)
        here, there = urlsplit(self._base_url), urlsplit(target)
        if (here.scheme, here.netloc) != (there.scheme, there.netloc):
            raise APIResponseInvalid(
                current,
                "next_page_uri",
                f"points away from {here.scheme}://{here.netloc}: {target}",
            )
        return target

    def _request(self, method: str, url: str, body: object = None) -> Deferred[Any]:
        """
        The decoded JSON answer (C{None} for an empty one) to one request.
        """
        key = self._key_provider().strip()
        if not key:
            return fail(NoAPIKey())
        headers = {
            "Authorization": f"Bearer {key}",
            "Ngrok-Version": "2",
            "User-Agent": f"ngrokd/{__version__}",
            "Accept": "application/json",
        }
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        d = Deferred.fromCoroutine(self._exchange(method, url, headers, data))
        d.addTimeout(self._timeout, self._clock)
        d.addErrback(self._unavailable, url, key)
        d.addCallback(self._decode, f"{method} {urlsplit(url).path}", url, key)
        return d

    async def _exchange(
        self, method: str, url: str, headers: dict[str, str], data: bytes | None
    ) -> tuple[IResponse, bytes]:
        """
        The response and its body. A cancelled request fails with
        L{CancelledError} (the Agent wraps it), so that a timeout is told
        from a failure and a caller's cancel stays a cancel.
        """
        try:
            response: IResponse = await self._http.request(
                method, url, headers=headers, data=data, allow_redirects=False
            )
            return response, await _read_body(response, url)
        except ConnectingCancelledError:
            raise CancelledError() from None
        except (ResponseFailed, RequestTransmissionFailed) as e:
            if all(reason.check(CancelledError) for reason in e.reasons):
                raise CancelledError() from None
            raise

    def _unavailable(self, failure: Failure, url: str, key: str) -> Failure:
        failure.trap(
            TimeoutError,
            ConnectError,
            DNSLookupError,
            ConnectionClosed,
            ResponseFailed,
            RequestTransmissionFailed,
            TLSError,
        )
        raise APIUnavailable(url, _redact(_failure_reason(failure), key))

    def _decode(
        self, exchange: tuple[IResponse, bytes], request: str, url: str, key: str
    ) -> Any:
        response, raw = exchange
        status: int = response.code
        if status >= 300:
            raise self._error(response, raw, request, key)
        self._on_answer()
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise APIResponseInvalid(url, "body", f"not JSON ({e})") from None

    def _error(
        self, response: IResponse, raw: bytes, request: str, key: str
    ) -> APIError:
        status: int = response.code
        retry_after = None
        if status in (429, 503):
            values = response.headers.getRawHeaders("Retry-After") or [None]
            retry_after = retry_after_seconds(values[0], self._clock.seconds())
        header_id = (response.headers.getRawHeaders("Ngrok-Operation-Id") or [None])[0]
        try:
            document = json.loads(raw)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            text = raw.decode("utf-8", "replace").strip()[:200]
            message = text or response.phrase.decode("ascii", "replace")
            return APIError(
                status, None, _redact(message, key), header_id, retry_after, request
            )
        details = document.get("details")
        operation_id = (
            details.get("operation_id") if isinstance(details, dict) else None
        )
        code = document.get("error_code")
        return APIError(
            status,
            code if isinstance(code, str) and code else None,
            _redact(str(document.get("msg") or ""), key),
            operation_id if isinstance(operation_id, str) else header_id,
            retry_after,
            request,
        )


def make_api(
    reactor: IReactorTCP,
    url: str,
    key_provider: Callable[[], str],
    tls_policy: IPolicyForHTTPS,
    timeout: float = 30.0,
    *,
    max_items: int = MAX_ITEMS,
    listing_timeout: float = LISTING_TIMEOUT,
    on_answer: Callable[[], object] = lambda: None,
) -> NgrokAPI:
    """
    The API client ngrokd runs with: HTTPS verified by C{tls_policy},
    connections kept open between polls.

    @param reactor: connects to the API; it must provide L{IReactorTime}
        too, which times the requests out.
    """
    if urlsplit(url).scheme != "https":
        _log.warn("api.url {url} is not https: the API key travels in clear", url=url)
    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent(
        reactor,
        contextFactory=tls_policy,
        connectTimeout=timeout,
        pool=pool,
    )
    return NgrokAPI(
        url,
        key_provider,
        HTTPClient(agent),
        IReactorTime(reactor),
        timeout,
        pool=pool,
        max_items=max_items,
        listing_timeout=listing_timeout,
        on_answer=on_answer,
    )
