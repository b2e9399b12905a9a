# -*- test-case-name: ngrokd.test.test_endpoints -*-
"""
Bound endpoints and what their URLs address.

ngrok reports each bound endpoint by URL (C{http://web.prod},
C{tcp://db.prod:5432}, older ones like C{https://api.example.app}). The URL
decides the hostname local clients use, the port they connect to, and the
C{host}/C{port} of the C{ConnRequest}: always the URL's hostname alone (the Go
original sent C{host:port} and broke every tcp endpoint) and its port with the
scheme's default filled in.

The hostname comes from the API, which we do not control, and ends up in
the hosts file and in listening sockets: only a DNS name is accepted (RFC
1123 labels of letters, digits and hyphens, punycode for other scripts, 253
characters in all), so that no URL can add a second name to a hosts line.
A wildcard endpoint's hostname is C{*.} and such a name (C{*.apps.prod}):
every name under the suffix reaches it (through the DNS server: no hosts
line can say that), and its C{ConnRequest} carries the URL's hostname as
written, the star included; the client's own bytes (C{Host}, SNI) tell the
ingress which name under it was meant.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from attrs import frozen

DEFAULT_PORTS = {"http": 80, "https": 443, "tls": 443}
SCHEMES = frozenset({"http", "https", "tcp", "tls"})
HTTP_SCHEMES = frozenset({"http", "https"})
#: The longest DNS name, without a final dot (RFC 1035 section 2.3.4).
MAX_HOSTNAME = 253
#: One RFC 1123 label, lowercase: 1 to 63 letters, digits or hyphens, with
#: no hyphen at either end.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
#: How much of a refused URL an error quotes.
_QUOTED = 100


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

    @property
    def is_wildcard(self) -> bool:
        """
        Whether every name under a suffix reaches it (C{*.apps.prod}).
        """
        return is_wildcard(self.host)


@frozen
class BoundEndpoint:
    """
    One bound endpoint as discovered: its API id, its URL as given, and the
    parsed target.
    """

    id: str
    url: str
    target: EndpointTarget


def is_dns_name(host: str) -> bool:
    """
    Whether C{host} (lowercase) is a DNS name ngrokd may bind and write to
    the hosts file: dot-separated RFC 1123 labels, at most 253 characters.
    """
    return (
        len(host) <= MAX_HOSTNAME
        and host.isascii()
        and all(_LABEL.fullmatch(label) for label in host.split("."))
    )


def is_wildcard(host: str) -> bool:
    """
    Whether C{host} is a wildcard name: C{*.} and a DNS name.
    """
    return host.startswith("*.")


def _quoted(text: str) -> str:
    """
    C{text} quoted for an error message, cut short if it is long.
    """
    if len(text) <= _QUOTED:
        return repr(text)
    return f"{text[:_QUOTED]!r}... ({len(text)} characters)"


def parse_endpoint_url(url: str, proto: str = "") -> EndpointTarget:
    """
    Parse a bound endpoint URL. A URL without a scheme takes C{proto}
    (ngrok's operator does the same, defaulting to https).
    """
    shown = _quoted(url)
    text = url.strip()
    if any(c.isspace() or not c.isprintable() for c in text):
        raise EndpointURLError(f"{shown}: holds whitespace or control characters")
    if "://" not in text:
        text = f"{proto or 'https'}://{text}"
    try:
        parts = urlsplit(text)
        explicit_port = parts.port
    except ValueError as e:
        raise EndpointURLError(f"{shown}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise EndpointURLError(
            f"{shown}: scheme {_quoted(scheme)} is not one of"
            f" {', '.join(sorted(SCHEMES))}"
        )
    if proto and proto.lower() != scheme:
        raise EndpointURLError(
            f"{shown}: its scheme disagrees with proto {_quoted(proto)}"
        )
    host = (parts.hostname or "").lower()
    if not host:
        raise EndpointURLError(f"{shown}: no hostname")
    if "*" in host.removeprefix("*."):
        raise EndpointURLError(
            f"{shown}: a wildcard is a whole first label and nothing else (*.apps.prod)"
        )
    if not parts.netloc.isascii() or not is_dns_name(host.removeprefix("*.")):
        raise EndpointURLError(
            f"{shown}: the hostname is not a DNS name (labels of letters,"
            f" digits and hyphens, punycode for other scripts, at most"
            f" {MAX_HOSTNAME} characters)"
        )
    if explicit_port is not None:
        port = explicit_port
    elif scheme in DEFAULT_PORTS:
        port = DEFAULT_PORTS[scheme]
    else:
        raise EndpointURLError(f"{shown}: a {scheme} URL must give its port")
    if not 1 <= port <= 65535:
        raise EndpointURLError(f"{shown}: port {port} is out of range")
    return EndpointTarget(scheme=scheme, host=host, port=port)


def join_host_port(host: str, port: int) -> str:
    """
    C{host:port}, with an IPv6 address in brackets.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
