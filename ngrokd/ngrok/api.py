# -*- test-case-name: ngrokd.test.test_api -*-
"""
ngrokd's client for ngrok's API: registering the operator, renewing its
certificate, and listing the endpoints bound to it.

Every failure is one of the four kinds of L{ngrokd.ngrok.apierrors}; the
answers are read by L{ngrokd.ngrok.answers}, within its bounds. The names
of both that the rest of ngrokd uses are importable from here too.

The key is read from a callable for every request, so a key set at run time
takes effect at once. Timeouts use the given clock, not treq's (which uses
the global reactor). A listing is bounded too: the number of its items and
pages, and the time it may take (beyond that, an L{APIUnavailable}).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urljoin, urlsplit

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
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
)
from twisted.web.iweb import IPolicyForHTTPS, IResponse

from ngrokd import __version__
from ngrokd.ngrok.answers import MAX_BODY as MAX_BODY
from ngrokd.ngrok.answers import MAX_STRING as MAX_STRING
from ngrokd.ngrok.answers import ApiEndpoint as ApiEndpoint
from ngrokd.ngrok.answers import (
    Fields,
    api_error,
    parse_endpoint,
    parse_operator,
    read_body,
)
from ngrokd.ngrok.answers import Operator as Operator
from ngrokd.ngrok.apierrors import APIError as APIError
from ngrokd.ngrok.apierrors import APIResponseInvalid as APIResponseInvalid
from ngrokd.ngrok.apierrors import APIUnavailable as APIUnavailable
from ngrokd.ngrok.apierrors import NoAPIKey as NoAPIKey
from ngrokd.ngrok.apierrors import PaginationError, redact

_log = Logger()

T = TypeVar("T")
#: The default limits of one listing: how many items, and how many seconds.
MAX_ITEMS = 10000
LISTING_TIMEOUT = 120.0


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


def _failure_reason(failure: Failure) -> str:
    error = failure.value
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, ResponseFailed | RequestTransmissionFailed):
        return "; ".join(_failure_reason(reason) for reason in error.reasons)
    if isinstance(error, TLSError):
        return f"TLS failed: {error}"
    return failure.getErrorMessage() or type(error).__name__


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
        return self._listing(url, "operators", parse_operator)

    def bound_endpoints(self, operator_id: str) -> Deferred[list[ApiEndpoint]]:
        """
        Every endpoint bound to the operator, following C{next_page_uri}
        until it is null or a page is empty.
        """
        url = self._operator_url(operator_id) + "/bound_endpoints"
        return self._listing(url, "endpoints", parse_endpoint)

    def _parse_operator(self, document: Any, url: str) -> Operator:
        return parse_operator(Fields(url, document))

    # Mechanics

    def _listing(
        self, url: str, name: str, parse: Callable[[Fields], T]
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

    async def _list(self, url: str, name: str, parse: Callable[[Fields], T]) -> list[T]:
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
            page = Fields(next_url, await self._request("GET", next_url))
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
            return response, await read_body(response, url)
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
        raise APIUnavailable(url, redact(_failure_reason(failure), key))

    def _decode(
        self, exchange: tuple[IResponse, bytes], request: str, url: str, key: str
    ) -> Any:
        response, raw = exchange
        status: int = response.code
        if status >= 300:
            raise api_error(response, raw, request, key, self._clock.seconds())
        self._on_answer()
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise APIResponseInvalid(url, "body", f"not JSON ({e})") from None


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
