# -*- test-case-name: ngrokd.test.test_endpoints -*-
"""
Bound endpoints and what their URLs address.

ngrok reports each bound endpoint by URL (C{http://web.prod},
C{tcp://db.prod:5432}, older ones like C{https://api.example.app}). The URL
decides the hostname local clients use, the port they connect to, and the
C{host}/C{port} of the C{ConnRequest}: always the URL's hostname alone (the Go
original sent C{host:port} and broke every tcp endpoint) and its port with the
scheme's default filled in.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from attrs import frozen

DEFAULT_PORTS = {"http": 80, "https": 443, "tls": 443}
SCHEMES = frozenset({"http", "https", "tcp", "tls"})
HTTP_SCHEMES = frozenset({"http", "https"})


class EndpointURLError(ValueError):
    """
    A bound endpoint's URL cannot be served; the message names the URL.
    """


@frozen
class EndpointTarget:
    """
    What one bound endpoint URL addresses.
    """

    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        """
        The normalised URL: endpoints that share it are one listener.
        """
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def http_host(self) -> str:
        """
        The C{Host} header value an HTTP client of this endpoint would send.
        """
        if DEFAULT_PORTS.get(self.scheme) == self.port:
            return self.host
        return f"{self.host}:{self.port}"

    @property
    def is_http(self) -> bool:
        return self.scheme in HTTP_SCHEMES


@frozen
class BoundEndpoint:
    """
    One bound endpoint as discovered: its API id, its URL as given, and the
    parsed target.
    """

    id: str
    url: str
    target: EndpointTarget


def parse_endpoint_url(url: str, proto: str = "") -> EndpointTarget:
    """
    Parse a bound endpoint URL. A URL without a scheme takes C{proto}
    (ngrok's operator does the same, defaulting to https).
    """
    text = url.strip()
    if "://" not in text:
        text = f"{proto or 'https'}://{text}"
    try:
        parts = urlsplit(text)
        explicit_port = parts.port
    except ValueError as e:
        raise EndpointURLError(f"{url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise EndpointURLError(
            f"{url!r}: scheme {scheme!r} is not one of {', '.join(sorted(SCHEMES))}"
        )
    if proto and proto.lower() != scheme:
        raise EndpointURLError(f"{url!r}: its scheme disagrees with proto {proto!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise EndpointURLError(f"{url!r}: no hostname")
    if "*" in host:
        raise EndpointURLError(f"{url!r}: a wildcard hostname cannot be bound locally")
    if explicit_port is not None:
        port = explicit_port
    elif scheme in DEFAULT_PORTS:
        port = DEFAULT_PORTS[scheme]
    else:
        raise EndpointURLError(f"{url!r}: a {scheme} URL must give its port")
    if not 1 <= port <= 65535:
        raise EndpointURLError(f"{url!r}: port {port} is out of range")
    return EndpointTarget(scheme=scheme, host=host, port=port)


def join_host_port(host: str, port: int) -> str:
    """
    C{host:port}, with an IPv6 address in brackets.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
