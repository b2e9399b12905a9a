# -*- test-case-name: ngrokd.test.test_devcloud_api -*-
"""
The devcloud's state: what ngrok's side knows, in memory, with no I/O.

One L{Cloud} stands for one ngrok account. It holds the CA that signs the
operators' CSRs, the API keys it accepts, the binding ingress address it
reports, the Kubernetes operators registered with it, and the bound endpoints
every operator sees (each with the local backend the devcloud's ingress
forwards to). The HTTP API (L{ngrokd.devcloud.api}) and the binding ingress
(L{ngrokd.devcloud.ingress}) are views over it. L{Faults} lets tests, and
users trying ngrokd against bad weather, make the API misbehave on purpose.

Where the real service decides something the devcloud cannot know (CEL
endpoint selectors), every operator simply sees every endpoint.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import json
import secrets
import string
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

from attrs import define, evolve, field, frozen
from cryptography import x509

from ngrokd.devcloud.ca import CertificateAuthority, IssuedCertificate

#: Default ports of endpoint URL schemes; tcp URLs must give their port.
DEFAULT_PORTS = {"http": 80, "https": 443, "tls": 443}
SCHEMES = frozenset(DEFAULT_PORTS) | {"tcp"}

#: The features an operator may enable (ngrok's API, lowercase).
FEATURES = frozenset({"bindings", "ingress", "gateway"})

_ID_ALPHABET = string.ascii_letters + string.digits

T = TypeVar("T")


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def random_id(prefix: str) -> str:
    """
    An ngrok-looking identifier: C{prefix}, an underscore, 27 random
    alphanumerics (C{k8sop_...}, C{op_...}).
    """
    return prefix + "_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(27))


class CloudError(Exception):
    """
    The request cannot be served; the API answers C{status} with an ngrok
    error body. C{error_code} is C{None} where ngrok sends none (its 404s).
    """

    def __init__(self, status: int, error_code: str | None, msg: str) -> None:
        super().__init__(f"{status} {error_code}: {msg}")
        self.status = status
        self.error_code = error_code
        self.msg = msg


class InvalidEndpointURL(ValueError):
    """
    An endpoint URL the devcloud cannot serve.
    """


def split_endpoint_url(url: str) -> tuple[str, str, int]:
    """
    The scheme, lowercase hostname and port (defaults filled in) of an
    endpoint URL such as C{http://svc.ns} or C{tcp://db.prod:5432}.

    @raise InvalidEndpointURL: unknown scheme, no host, bad or missing port.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidEndpointURL(f"{url!r}: scheme must be one of {sorted(SCHEMES)}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidEndpointURL(f"{url!r}: no host")
    try:
        port = parts.port
    except ValueError:
        raise InvalidEndpointURL(f"{url!r}: bad port") from None
    if port is None:
        if scheme == "tcp":
            raise InvalidEndpointURL(f"{url!r}: a tcp URL must give its port")
        port = DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise InvalidEndpointURL(f"{url!r}: port out of range")
    return scheme, host, port


@frozen
class CloudEndpoint:
    """
    A bound endpoint: ngrok's C{url} and C{proto}, and the local C{backend}
    (host, port) that the devcloud ingress connects to for it.
    """

    id: str
    url: str
    proto: str
    backend: tuple[str, int]
    created_at: datetime.datetime = field(factory=_utcnow, eq=False)
    #: The URL's scheme, hostname and port (defaults filled in).
    scheme: str = field(init=False)
    host: str = field(init=False)
    port: int = field(init=False)

    @scheme.default
    def _scheme(self) -> str:
        return split_endpoint_url(self.url)[0]

    @host.default
    def _host(self) -> str:
        return split_endpoint_url(self.url)[1]

    @port.default
    def _port(self) -> int:
        return split_endpoint_url(self.url)[2]


@frozen
class CloudOperator:
    """
    A registered Kubernetes operator, as ngrok stores it. C{csr_pem} is the
    CSR its current certificate was issued for; C{serials} are the serial
    numbers of every certificate issued to it.
    """

    id: str
    description: str
    metadata: str
    enabled_features: tuple[str, ...]
    region: str
    deployment: dict[str, str]
    selectors: tuple[str, ...]
    csr_pem: bytes
    cert: IssuedCertificate
    serials: frozenset[int]
    created_at: datetime.datetime
    updated_at: datetime.datetime


@frozen
class Injection:
    """
    One scripted misbehaviour of the API, used by the next request whose path
    contains C{path_contains}: wait C{delay} seconds, then answer C{status}
    with C{body} (an ngrok error body for C{status} when C{None}) and a
    C{Retry-After} header when C{retry_after} is set. With C{status} C{None}
    the request is served normally after the delay.
    """

    status: int | None = None
    body: bytes | None = None
    retry_after: str | None = None
    delay: float = 0.0
    path_contains: str = ""


@define
class Faults:
    """
    Failures the devcloud API injects, for tests and for trying ngrokd against
    a misbehaving ngrok:

      - C{next_status(503, count=2, retry_after=7)}: the next two requests get
        a 503 ngrok error with C{Retry-After: 7}.
      - C{next_body(b"{oops", status=200)}: the next request gets this body
        verbatim (invalid JSON, or JSON of the wrong shape).
      - C{next_delay(60)}: the next request is answered 60 seconds late (the
        API resource needs a clock for this).
      - C{page_loop = True}: every bound endpoints page names itself as
        C{next_page_uri}.
      - C{extra_endpoints.append({...})}: raw endpoint objects added to the
        last bound endpoints page as they are, e.g. one with an unparseable
        C{url}.

    Each scripted response may be limited to paths containing a string
    (C{path_contains="bound_endpoints"}).
    """

    page_loop: bool = False
    extra_endpoints: list[dict[str, object]] = field(factory=list)
    _queue: list[Injection] = field(factory=list)

    def next_status(
        self,
        status: int,
        count: int = 1,
        retry_after: float | str | None = None,
        path_contains: str = "",
    ) -> None:
        header = None if retry_after is None else str(retry_after)
        self._add(count, Injection(status, None, header, 0.0, path_contains))

    def next_body(
        self, body: bytes, status: int = 200, count: int = 1, path_contains: str = ""
    ) -> None:
        self._add(count, Injection(status, body, None, 0.0, path_contains))

    def next_delay(
        self, seconds: float, count: int = 1, path_contains: str = ""
    ) -> None:
        self._add(count, Injection(None, None, None, seconds, path_contains))

    def _add(self, count: int, injection: Injection) -> None:
        self._queue.extend([injection] * count)

    def take(self, path: str) -> Injection | None:
        """
        Remove and return the first scripted response for C{path}, if any.
        """
        for i, injection in enumerate(self._queue):
            if injection.path_contains in path:
                return self._queue.pop(i)
        return None


def _sorted_index(
    items: Iterable[T], key: Callable[[T], str]
) -> tuple[list[T], list[str]]:
    """
    C{items} in ascending C{key} order, and their keys, for L{_page_of}.
    """
    ordered = sorted(items, key=key)
    return ordered, [key(item) for item in ordered]


def _page_of(
    index: tuple[list[T], list[str]], before_id: str | None, limit: int
) -> tuple[list[T], str | None]:
    """
    Items of a L{_sorted_index} in descending key order strictly below
    C{before_id}, at most C{limit} of them, and the cursor for the next page
    (C{None} when this page is the last). A page costs its own size, not the
    whole list's, so that walking thousands of endpoints stays linear.
    """
    ordered, keys = index
    end = len(keys) if before_id is None else bisect.bisect_left(keys, before_id)
    start = max(0, end - limit)
    return ordered[start:end][::-1], keys[start] if start > 0 else None


class Cloud:
    """
    One ngrok account in memory. Every method is synchronous and does no I/O.

    @ivar ca: signs operators' CSRs (and, in the plugin, the servers' certs).
    @ivar api_keys: the bearer tokens the API accepts.
    @ivar ingress_endpoint: "host:port" reported as C{binding.ingress_endpoint}.
    @ivar cert_days: validity of issued binding certificates, in days.
    @ivar page_size: default and largest page of list responses.
    @ivar bindings_enabled: when false, registering fails with ERR_NGROK_19002
        as it does for an ngrok account without Kubernetes bindings.
    @ivar faults: scripted misbehaviour of the API.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        api_keys: Iterable[str],
        ingress_endpoint: str,
        cert_days: float = 365.0,
        page_size: int = 100,
        now: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self.ca = ca
        self.api_keys = set(api_keys)
        self.ingress_endpoint = ingress_endpoint
        self.cert_days = cert_days
        self.page_size = page_size
        self.bindings_enabled = True
        self.faults = Faults()
        self._now = now
        self._operators: dict[str, CloudOperator] = {}
        #: Called after every change of the operators (to persist them).
        self.on_change: Callable[[], object] | None = None
        self._endpoints: dict[str, CloudEndpoint] = {}
        self._by_address: dict[tuple[str, int], CloudEndpoint] = {}
        #: The endpoints sorted for paging; C{None} after a change.
        self._endpoint_index: tuple[list[CloudEndpoint], list[str]] | None = None

    # Endpoints

    def add_endpoint(
        self, url: str, backend: tuple[str, int], proto: str | None = None
    ) -> CloudEndpoint:
        """
        Bind C{url}, forwarded to C{backend}. Adding a URL again replaces its
        backend and keeps its id (ids are derived from the URL, so they are
        stable across restarts too). C{proto} defaults to the URL's scheme.

        @raise InvalidEndpointURL: the URL cannot be served, or another URL
            already uses its host and port.
        """
        scheme, host, port = split_endpoint_url(url)
        other = self._by_address.get((host, port))
        if other is not None and other.url != url:
            raise InvalidEndpointURL(f"{url!r}: {host}:{port} is already {other.url}")
        previous = self._endpoints.get(url)
        endpoint = CloudEndpoint(
            id="ep_" + hashlib.sha256(url.encode()).hexdigest()[:27],
            url=url,
            proto=proto or scheme,
            backend=backend,
            created_at=previous.created_at if previous else self._now(),
        )
        self._endpoints[url] = endpoint
        self._by_address[host, port] = endpoint
        self._endpoint_index = None
        return endpoint

    def remove_endpoint(self, url: str) -> None:
        """
        Unbind C{url}; unknown URLs are ignored.
        """
        endpoint = self._endpoints.pop(url, None)
        if endpoint is not None:
            del self._by_address[endpoint.host, endpoint.port]
            self._endpoint_index = None

    def endpoints(self) -> list[CloudEndpoint]:
        return list(self._endpoints.values())

    def find_endpoint(self, host: str, port: int) -> CloudEndpoint | None:
        """
        The endpoint whose URL has this hostname (case-insensitive, trailing
        dot ignored) and port (scheme defaults filled in), as the binding
        ingress looks it up from a ConnRequest.
        """
        return self._by_address.get((host.lower().rstrip("."), port))

    def page_endpoints(
        self, before_id: str | None, limit: int
    ) -> tuple[list[CloudEndpoint], str | None]:
        """
        One page of endpoints and the C{before_id} of the next (or C{None}).
        """
        if self._endpoint_index is None:
            self._endpoint_index = _sorted_index(self._endpoints.values(), _id)
        return _page_of(self._endpoint_index, before_id, limit)

    # Operators

    def register(
        self,
        description: str,
        metadata: str,
        enabled_features: Sequence[str],
        region: str,
        deployment: dict[str, str],
        selectors: Sequence[str],
        csr_pem: bytes | None,
    ) -> CloudOperator:
        """
        Create an operator and issue its binding certificate.

        @raise CloudError: bindings not enabled (400 ERR_NGROK_19002), no CSR
            or a bad one (400 ERR_NGROK_215).
        """
        if not self.bindings_enabled:
            raise CloudError(
                400,
                "ERR_NGROK_19002",
                "Kubernetes Operators and Bindings not enabled for this account",
            )
        if "bindings" not in enabled_features:
            raise CloudError(
                400,
                "ERR_NGROK_19002",
                "this devcloud serves Kubernetes bindings only:"
                ' enabled_features must include "bindings"',
            )
        if csr_pem is None:
            raise CloudError(
                400,
                "ERR_NGROK_215",
                "The value provided for the request parameter binding.csr is"
                " invalid: a CSR is required",
            )
        cert = self._sign(csr_pem)
        now = self._now()
        operator = CloudOperator(
            id=random_id("k8sop"),
            description=description,
            metadata=metadata,
            enabled_features=tuple(enabled_features),
            region=region,
            deployment=dict(deployment),
            selectors=tuple(selectors),
            csr_pem=csr_pem,
            cert=cert,
            serials=frozenset({_serial(cert)}),
            created_at=now,
            updated_at=now,
        )
        self._operators[operator.id] = operator
        self._changed()
        return operator

    def update(
        self,
        operator_id: str,
        description: str | None = None,
        metadata: str | None = None,
        selectors: Sequence[str] | None = None,
        csr_pem: bytes | None = None,
    ) -> CloudOperator:
        """
        Change an operator. A CSR issues a new certificate only when it
        differs from the one the current certificate was issued for: as with
        ngrok, re-sending the old CSR returns the old certificate.

        @raise CloudError: unknown operator (404), bad CSR (400).
        """
        operator = self.get_operator(operator_id)
        cert, serials, csr = operator.cert, operator.serials, operator.csr_pem
        if csr_pem is not None and csr_pem.strip() != csr.strip():
            cert, csr = self._sign(csr_pem), csr_pem
            serials = serials | {_serial(cert)}
        operator = evolve(
            operator,
            description=operator.description if description is None else description,
            metadata=operator.metadata if metadata is None else metadata,
            selectors=operator.selectors if selectors is None else tuple(selectors),
            csr_pem=csr,
            cert=cert,
            serials=serials,
            updated_at=self._now(),
        )
        self._operators[operator_id] = operator
        self._changed()
        return operator

    def get_operator(self, operator_id: str) -> CloudOperator:
        """
        @raise CloudError: 404 when there is no such operator.
        """
        try:
            return self._operators[operator_id]
        except KeyError:
            raise CloudError(404, None, "Resource not found") from None

    def delete_operator(self, operator_id: str) -> None:
        """
        @raise CloudError: 404 when there is no such operator.
        """
        self.get_operator(operator_id)
        del self._operators[operator_id]
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def dump_operators(self) -> bytes:
        """
        The operators as JSON, for L{load_operators} after a restart: ngrok
        does not forget an operator when its servers restart, and neither
        does the devcloud.
        """
        return json.dumps(
            [_operator_json(o) for o in self._operators.values()], indent=2
        ).encode()

    def load_operators(self, data: bytes) -> None:
        """
        Restore what L{dump_operators} wrote.

        @raise ValueError: the data is not such a dump.
        """
        try:
            operators = [_operator_from_json(each) for each in json.loads(data)]
        except (TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"not a dump of devcloud operators: {e!r}") from None
        self._operators = {o.id: o for o in operators}

    def operators(self) -> list[CloudOperator]:
        return list(self._operators.values())

    def page_operators(
        self, before_id: str | None, limit: int
    ) -> tuple[list[CloudOperator], str | None]:
        """
        One page of operators and the C{before_id} of the next (or C{None}).
        """
        index = _sorted_index(self._operators.values(), _id)
        return _page_of(index, before_id, limit)

    def operator_for_serial(self, serial: int) -> CloudOperator | None:
        """
        The operator a client certificate with this serial number was issued
        to, if that operator still exists: the binding ingress accepts only
        certificates of registered operators.
        """
        for operator in self._operators.values():
            if serial in operator.serials:
                return operator
        return None

    def _sign(self, csr_pem: bytes) -> IssuedCertificate:
        try:
            return self.ca.sign_csr(csr_pem, self.cert_days)
        except ValueError as e:
            raise CloudError(
                400,
                "ERR_NGROK_215",
                "The value provided for the request parameter binding.csr is"
                f" invalid: {e}",
            ) from None


def _id(item: CloudEndpoint | CloudOperator) -> str:
    return item.id


def _serial(cert: IssuedCertificate) -> int:
    return x509.load_pem_x509_certificate(cert.cert_pem).serial_number


def _operator_json(operator: CloudOperator) -> dict[str, object]:
    return {
        "id": operator.id,
        "description": operator.description,
        "metadata": operator.metadata,
        "enabled_features": list(operator.enabled_features),
        "region": operator.region,
        "deployment": operator.deployment,
        "selectors": list(operator.selectors),
        "csr_pem": operator.csr_pem.decode(),
        "cert_pem": operator.cert.cert_pem.decode(),
        "not_before": operator.cert.not_before.isoformat(),
        "not_after": operator.cert.not_after.isoformat(),
        "serials": sorted(operator.serials),
        "created_at": operator.created_at.isoformat(),
        "updated_at": operator.updated_at.isoformat(),
    }


def _operator_from_json(data: dict[str, object]) -> CloudOperator:
    def text(key: str) -> str:
        value = data[key]
        if not isinstance(value, str):
            raise TypeError(f"{key} is not a string")
        return value

    def strings(key: str) -> tuple[str, ...]:
        value = data[key]
        if not isinstance(value, list):
            raise TypeError(f"{key} is not a list")
        return tuple(str(each) for each in value)

    def time(key: str) -> datetime.datetime:
        return datetime.datetime.fromisoformat(text(key))

    deployment = data["deployment"]
    serials = data["serials"]
    if not isinstance(deployment, dict) or not isinstance(serials, list):
        raise TypeError("deployment or serials has the wrong type")
    return CloudOperator(
        id=text("id"),
        description=text("description"),
        metadata=text("metadata"),
        enabled_features=strings("enabled_features"),
        region=text("region"),
        deployment={str(k): str(v) for k, v in deployment.items()},
        selectors=strings("selectors"),
        csr_pem=text("csr_pem").encode(),
        cert=IssuedCertificate(
            cert_pem=text("cert_pem").encode(),
            not_before=time("not_before"),
            not_after=time("not_after"),
        ),
        serials=frozenset(int(each) for each in serials),
        created_at=time("created_at"),
        updated_at=time("updated_at"),
    )
