# -*- test-case-name: ngrokd.test.test_config -*-
"""
The checks of values that are addresses: ports, listen modes, blocks,
host names, domains and C{host:port} pairs. Each is a pure function of one
YAML node (and the file's context) that returns the value, normalised, or
refuses it, naming the file, line and key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TypeVar

import yaml

from ngrokd.config import values
from ngrokd.config.context import STR, Context, pairs, shown
from ngrokd.endpoints import is_dns_name, join_host_port

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: C{net.subnet6}: a unique local /64 derived from the state directory
#: (L{ngrokd.host.ula}), or none.
SUBNET6_AUTO = "auto"
SUBNET6_OFF = ""
#: The longest IPv6 prefix: a longer one holds too few names to be useful.
_MAX_PREFIX6 = 120
#: macOS binds endpoint addresses as loopback aliases, so they must be in 127/8.
DARWIN_SUBNET = ipaddress.IPv4Network("127.0.0.0/8")
_N = TypeVar("_N", bound=IPNetwork)


def port(node: yaml.Node, key: str, ctx: Context) -> int:
    value = ctx.value(node, key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        ctx.fail(node, key, f"must be a port number 1..65535, got {shown(node)}")
    return value


def _is_mode(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return value == "virtual"
    return True


def listen_mode(node: yaml.Node, key: str, ctx: Context) -> str:
    value = values.string(node, key, ctx)
    if not _is_mode(value):
        ctx.fail(
            node,
            key,
            f"must be virtual, 0.0.0.0, :: or an IP address, got {shown(node)}",
        )
    return value


def subnet(node: yaml.Node, key: str, ctx: Context) -> IPNetwork:
    value = values.string(node, key, ctx)
    subnet = _block(
        node, key, ctx, value, ipaddress.ip_network, "a CIDR block like 10.107.0.0/16"
    )
    if subnet.num_addresses < 4:
        ctx.fail(
            node,
            key,
            f"{value} is too small: it needs a gateway (.1) and at least one "
            "endpoint address (.2); use a prefix of /30 or shorter",
        )
    if ctx.platform == "darwin" and not (
        isinstance(subnet, ipaddress.IPv4Network) and subnet.subnet_of(DARWIN_SUBNET)
    ):
        ctx.warn(
            node,
            key,
            f"macOS virtual mode needs addresses in {DARWIN_SUBNET}; "
            f"{subnet} is outside it",
        )
    return subnet


def _block(
    node: yaml.Node,
    key: str,
    ctx: Context,
    value: str,
    kind: Callable[..., _N],
    expected: str,
) -> _N:
    """
    C{value} read by C{kind} as a block with a prefix length; host bits
    set are read as its network, with a warning.
    """
    try:
        if "/" not in value:
            raise ValueError("no prefix length")
        subnet = kind(value, strict=False)
    except ValueError:
        ctx.fail(node, key, f"must be {expected}, got {value!r}")
    if subnet.network_address != ipaddress.ip_interface(value).ip:
        ctx.warn(node, key, f"{value} has host bits set; using {subnet}")
    return subnet


def subnet6(node: yaml.Node, key: str, ctx: Context) -> ipaddress.IPv6Network | str:
    """
    C{auto}, C{""} (no IPv6 addresses) or an IPv6 block; macOS has none.
    """
    value = values.string(node, key, ctx).strip()
    if value in (SUBNET6_AUTO, SUBNET6_OFF):
        return value
    subnet = _block(
        node,
        key,
        ctx,
        value,
        ipaddress.IPv6Network,
        'auto, "" (no IPv6) or an IPv6 block like fd6e:6772:6f6b::/64',
    )
    if subnet.prefixlen > _MAX_PREFIX6:
        ctx.fail(
            node,
            key,
            f"{value} is too small: use a prefix of /{_MAX_PREFIX6} or shorter"
            " (/64 is usual)",
        )
    if ctx.platform == "darwin":
        ctx.warn(
            node,
            key,
            "macOS virtual mode is IPv4 only (aliases of lo0 in 127.0.0.0/8); ignored",
        )
        return SUBNET6_OFF
    return subnet


def hostnames(node: yaml.Node, key: str, ctx: Context) -> tuple[str, ...]:
    """
    Bare host names (no port, scheme or path), lowercased.
    """
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(node, key, f"must be a list of host names, got {shown(node)}")
    names = []
    for i, item in enumerate(node.value):
        name = values.nonempty(item, f"{key}[{i}]", ctx)
        if any(c in name for c in " /:[]@"):
            ctx.fail(item, f"{key}[{i}]", f"must be a bare host name, got {name!r}")
        names.append(name.lower().rstrip("."))
    return tuple(names)


def domains(node: yaml.Node, key: str, ctx: Context) -> tuple[str, ...]:
    """
    DNS domains, lowercased, without a leading or final dot, each once.
    """
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(node, key, f"must be a list of domains, got {shown(node)}")
    domains: dict[str, None] = {}
    for i, item in enumerate(node.value):
        where = f"{key}[{i}]"
        value = values.nonempty(item, where, ctx)
        domain = value.lower().removeprefix(".").removesuffix(".")
        if domain.startswith("*."):
            ctx.fail(
                item,
                where,
                f"write the domain alone: {domain[2:]!r} takes in every name under it",
            )
        if not is_dns_name(domain):
            ctx.fail(
                item,
                where,
                f"must be a DNS domain like example.internal (labels of letters,"
                f" digits and hyphens), got {value!r}",
            )
        domains[domain] = None
    return tuple(domains)


def overrides(node: yaml.Node, key: str, ctx: Context) -> dict[str, str]:
    """
    Hostname to listen mode; the hostname is bare, as in the endpoint's URL.
    """
    overrides = {}
    for host_node, mode_node in pairs(node, key, ctx):
        host = host_node.value
        if host_node.tag != STR or not host or any(c in host for c in " /:"):
            ctx.fail(
                host_node,
                key,
                f"keys must be bare hostnames, got {shown(host_node)}",
            )
        overrides[host] = listen_mode(mode_node, f"{key}.{host}", ctx)
    return overrides


def ingress_endpoint(node: yaml.Node, key: str, ctx: Context) -> str:
    """
    C{host[:port]} or C{[ipv6][:port]}, normalised to C{host:port}.
    """
    value = values.nonempty(node, key, ctx)
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            ctx.fail(node, key, f"must be host:port or [ipv6]:port, got {value!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            ctx.fail(node, key, f"{host!r} in brackets is not an IPv6 address")
        host, port = f"[{host}]", rest[1:] if rest else "443"
    elif value.count(":") > 1:
        ctx.fail(
            node,
            key,
            "must be host:port (no scheme; an IPv6 address in brackets), "
            f"got {value!r}",
        )
    else:
        host, colon, port = value.partition(":")
        port = port if colon else "443"
    if not host or any(c.isspace() or c == "/" for c in host):
        ctx.fail(node, key, f"must be host:port, got {value!r}")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        ctx.fail(node, key, f"port must be 1..65535, got {port!r}")
    return f"{host}:{int(port)}"


def listen_address(node: yaml.Node, key: str, ctx: Context) -> str:
    """
    C{address:port} or C{[ipv6]:port} to listen on, normalised; C{""} stays
    C{""} (off).
    """
    value = values.string(node, key, ctx).strip()
    if not value:
        return ""
    host, colon, port = value.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        ctx.fail(
            node,
            key,
            "must be an IP address and a port like 127.0.0.1:8081, 0.0.0.0:8081"
            f" or [::1]:8081 (empty: off), got {value!r}",
        )
    if address.version == 6 and bare == host:
        ctx.fail(node, key, f"put an IPv6 address in brackets: [{bare}]:{port}")
    if not (colon and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        ctx.fail(node, key, f"port must be 1..65535, got {port!r}")
    return join_host_port(str(address), int(port))


def _dns_server(text: str, default_port: int | None) -> str:
    """
    C{text} (C{address}, C{address:port}, C{[ipv6]:port}, or a bare IPv6
    address when C{default_port} is given) as C{address:port}.

    @raise ValueError: saying what is wrong.
    """
    host, port = text, ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("an IPv6 address goes in brackets: [::1]:53")
        port = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("must be an IP address (a name would need DNS itself)")
    if not port:
        if default_port is None:
            raise ValueError("must give its port: ADDRESS:PORT ([IPv6]:PORT)")
        return join_host_port(str(address), default_port)
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"port must be 1..65535, got {port!r}")
    return join_host_port(str(address), int(port))


def dns_listen(node: yaml.Node, key: str, ctx: Context) -> str:
    """
    Where the DNS server listens, C{address[:port]} (port 53 by default);
    C{""}: chosen by the mode (see L{DnsConfig.listen}).
    """
    value = values.string(node, key, ctx).strip()
    if not value:
        return ""
    try:
        return _dns_server(value, 53)
    except ValueError as e:
        ctx.fail(node, key, f"{e}, like 10.107.0.1:53; got {value!r}")


def dns_upstreams(node: yaml.Node, key: str, ctx: Context) -> tuple[str, ...]:
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(node, key, f"must be a list of addresses, got {shown(node)}")
    servers: dict[str, None] = {}
    for i, item in enumerate(node.value):
        where = f"{key}[{i}]"
        value = values.nonempty(item, where, ctx).strip()
        try:
            servers[_dns_server(value, 53)] = None
        except ValueError as e:
            ctx.fail(item, where, f"{e}, like 192.0.2.53 or [2001:db8::53]:53")
    return tuple(servers)
