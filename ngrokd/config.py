# -*- test-case-name: ngrokd.test.test_config -*-
"""
The daemon's settings: C{config.yml} read into frozen values.

The keys and defaults are the Go ngrokd's, so its config files keep working.
Unlike the original, every value is checked when the file is loaded (the
original checked only on reload, and panicked on some values), a key that is
present is honoured even when it is zero or empty, and every error or warning
names the file, the line and the dotted key, so a bad edit is refused with a
message that says where to look.

Parsing is a pure function of the text, the environment and the platform;
only L{load_config} reads a file.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import stat
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import attrs
import yaml
from attrs import field, frozen
from yaml.constructor import SafeConstructor

from ngrokd import instance as _instance
from ngrokd.endpoints import is_dns_name, join_host_port
from ngrokd.pem import MAX_BUNDLE, PEMError, parse_certificates
from ngrokd.readfile import read_regular

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_DEFAULT_SUBNET = ipaddress.ip_network("10.107.0.0/16")
#: C{net.subnet6}: a unique local /64 derived from the state directory
#: (L{ngrokd.host.ula}), or none.
SUBNET6_AUTO = "auto"
SUBNET6_OFF = ""
#: The longest IPv6 prefix: a longer one holds too few names to be useful.
_MAX_PREFIX6 = 120
#: macOS binds endpoint addresses as loopback aliases, so they must be in 127/8.
_DARWIN_SUBNET = ipaddress.IPv4Network("127.0.0.0/8")
#: Longer waits are mistakes (and huge integers do not fit a float).
_MAX_SECONDS = 1e9
#: A renewal margin longer than this is a mistake (certificates last a year).
_MAX_DAYS = 3650
#: A larger count limit is a mistake.
_MAX_COUNT = 1_000_000
#: Warm connections to the ingress: each is a socket and a TLS session.
_MAX_POOL = 1000
_LOG_LEVELS = {"debug", "info", "warn", "warning", "error", "critical"}
_LOG_FORMATS = ("text", "json")
_NULL = "tag:yaml.org,2002:null"
_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"
#: The largest config file read, in characters: PyYAML composes a few
#: hundred kilobytes a second, and a real config is a few kilobytes.
MAX_CONFIG_SIZE = 256 * 1024
#: Nesting deeper than this is refused before it is built (the settings
#: nest three deep; PyYAML recurses once per level).
MAX_DEPTH = 32
#: Unknown keys warned about one by one; more are counted in one warning.
_MAX_UNKNOWN = 20
#: Keys the Go ngrokd once read, with what replaced them.
_RETIRED = {
    "network_accessible": "no longer read; network access is chosen by "
    "net.listen_interface and net.overrides",
}


class ConfigError(Exception):
    """
    The configuration file cannot be read or holds a value ngrokd refuses.
    """


class _TooDeep(Exception):
    """
    The document nests deeper than L{MAX_DEPTH}, at C{line} under C{key}.
    """

    def __init__(self, line: int, key: str) -> None:
        super().__init__(line, key)
        self.line = line
        self.key = key


class _Loader(yaml.SafeLoader):
    """
    PyYAML's safe loader, refusing nesting deeper than L{MAX_DEPTH} before
    its recursion builds it.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._keys: list[str] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if isinstance(index, yaml.ScalarNode):
            self._keys.append(f".{index.value}")
        elif isinstance(index, int):
            self._keys.append(f"[{index}]")
        else:
            self._keys.append("")
        try:
            if len(self._keys) > MAX_DEPTH:
                key = "".join(self._keys).lstrip(".")
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _TooDeep(event.start_mark.line + 1, key)
            return super().compose_node(parent, index)
        finally:
            self._keys.pop()


def _frozen_mapping(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@frozen
class ApiConfig:
    """
    How to reach the ngrok API.
    """

    url: str
    #: Never shown: not in the repr, nor in an error about its value.
    key: str = field(repr=False)
    ca_bundle: str | None
    #: Seconds allowed for one API request.
    timeout: float = 30.0
    #: Register a new operator by itself when ngrok no longer has ours.
    reregister_if_deleted: bool = False


@frozen
class IngressConfig:
    """
    How to reach ngrok's binding ingress; C{endpoint} is always C{host:port}
    (an IPv6 host in brackets).
    """

    endpoint: str
    ca_bundle: str | None
    insecure_skip_verify: bool
    connect_timeout: float
    upgrade_timeout: float
    #: Dials (TCP, TLS, upgrade) in progress at once; the others queue.
    max_pending_dials: int = 100
    #: Seconds a connection may wait in that queue.
    dial_queue_timeout: float = 60.0
    #: The most connections kept ready (TLS done, no request yet); 0: none.
    pool_size: int = 16
    #: Seconds without an accepted connection after which none are kept.
    pool_idle_timeout: float = 30.0
    #: Seconds a ready connection is kept before it is replaced.
    pool_max_age: float = 20.0
    #: Seconds after the last accepted connection during which one is kept
    #: ready where a handshake is worth saving; none after.
    pool_linger: float = 300.0
    #: Send a client's first bytes right behind the request, before the
    #: ingress answers.
    early_data: bool = True

    @property
    def host(self) -> str:
        """
        The host part, without brackets: the dial target and the TLS SNI name.
        """
        host = self.endpoint.rpartition(":")[0]
        return host[1:-1] if host.startswith("[") else host

    @property
    def port(self) -> int:
        return int(self.endpoint.rpartition(":")[2])


@frozen
class ServerConfig:
    """
    The daemon's own files and verbosity.
    """

    log_level: str
    socket_path: str
    state_dir: str
    client_cert: str
    client_key: str
    #: Renew the client certificate this many days before it expires.
    renew_before_days: float = 30.0
    #: C{address:port} (an IPv6 address in brackets) of the health and
    #: metrics HTTP server; C{""}: no such server.
    health_address: str = "127.0.0.1:8081"
    #: The group that owns the control socket ("": the daemon's own).
    socket_group: str = ""
    #: The group whose members may run commands that change the daemon.
    admin_group: str = ""
    #: Host names, besides C{localhost} and IP addresses, that the web page
    #: answers to (its defence against DNS rebinding).
    web_hosts: tuple[str, ...] = ()
    #: The instance's name (C{""}: the unnamed one); see L{ngrokd.instance}.
    instance: str = ""
    #: Seconds open connections have to finish when the daemon stops.
    shutdown_grace: float = 30.0
    #: Reset a connection on which nothing moved for this long (None: never).
    idle_timeout: float | None = None
    #: Endpoints with series of their own in C{/metrics} (0: none).
    metrics_per_endpoint: int = 10000
    #: How the log is written: C{text} or C{json} lines.
    log_format: str = "text"


@frozen
class DiscoveryConfig:
    """
    How bound endpoints are discovered.
    """

    poll_interval: float
    selectors: tuple[str, ...]
    #: More endpoints than this in one poll fail the poll.
    max_endpoints: int = 10000
    #: Seconds allowed for one whole poll, every page included.
    poll_timeout: float = 120.0


@frozen
class NetConfig:
    """
    Where discovered endpoints listen locally.
    """

    interface_name: str
    subnet: _IPNetwork
    listen_interface: str
    start_port: int
    overrides: Mapping[str, str] = field(converter=_frozen_mapping, hash=False)
    hosts_file: str
    #: Seconds an address or port given up is kept from other endpoints.
    reuse_after: float = 3600.0
    #: The domains virtual-mode names must be in, lowercase (empty: any).
    allowed_domains: tuple[str, ...] = ()
    #: Where each virtual-mode name's IPv6 address comes from: a block,
    #: L{SUBNET6_AUTO} (derived in the state directory) or L{SUBNET6_OFF}.
    subnet6: ipaddress.IPv6Network | str = SUBNET6_AUTO


#: How names may reach the system's resolver (C{dns.mode}).
DNS_MODES = ("auto", "resolved", "resolver-files", "hosts", "off")


@frozen
class DnsConfig:
    """
    ngrokd's DNS server, and how the system's resolver is pointed at it.
    """

    #: One of L{DNS_MODES}.
    mode: str = "auto"
    #: C{address:port} the server listens on; C{""}: the first host of
    #: C{net.subnet}, port 53, in virtual mode, and none in network mode.
    listen: str = ""
    #: C{address:port} servers other names are forwarded to; empty: the
    #: system's own (systemd-resolved's, or C{resolv.conf}'s).
    upstreams: tuple[str, ...] = ()


@frozen
class Config:
    """
    Everything in C{config.yml}, with defaults and the environment applied.
    """

    path: str
    api: ApiConfig
    ingress: IngressConfig
    server: ServerConfig
    bound_endpoints: DiscoveryConfig
    net: NetConfig
    dns: DnsConfig = DnsConfig()


@frozen
class LoadedConfig:
    """
    A configuration and the warnings (unknown keys, doubtful values) found in
    it, each naming the file, line and key.
    """

    config: Config
    warnings: tuple[str, ...]
    #: Where each key set in the file is: C{"FILE:LINE: KEY"}.
    locations: Mapping[str, str] = attrs.field(factory=dict, eq=False)

    def where(self, key: str) -> str:
        """
        C{"FILE:LINE: KEY"} for a key set in the file, C{"FILE: KEY"} for
        one left to its default.
        """
        return self.locations.get(key) or f"{self.config.path}: {key}"


@attrs.define
class _Context:
    """
    What the checks need: where the file is, its permission bits (when
    known), the platform, and where to put warnings.
    """

    path: str
    platform: str
    mode: int | None = None
    warnings: list[str] = attrs.Factory(list)
    locations: dict[str, str] = attrs.Factory(dict)
    constructor: SafeConstructor = attrs.Factory(SafeConstructor)

    def _where(self, node: yaml.Node, key: str) -> str:
        where = f"{self.path}:{node.start_mark.line + 1}"
        return f"{where}: {key}" if key else where

    def fail(self, node: yaml.Node, key: str, message: str) -> NoReturn:
        raise ConfigError(f"{self._where(node, key)}: {message}")

    def warn(self, node: yaml.Node, key: str, message: str) -> None:
        self.warnings.append(f"{self._where(node, key)}: {message}")

    def value(self, node: yaml.Node, key: str) -> object:
        """
        The Python value of a scalar node.
        """
        if not isinstance(node, yaml.ScalarNode):
            return None
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError) as e:
            self.fail(node, key, f"cannot read the value: {e}")


_Check = Callable[[yaml.Node, str, _Context], Any]


def _shown(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if node.tag == _NULL:
        return "null"
    return repr(node.value) if node.tag == _STR else str(node.value)


def _string(node: yaml.Node, key: str, ctx: _Context) -> str:
    value = ctx.value(node, key)
    if not isinstance(value, str):
        hint = " (quote it to make it a string)" if value is not None else ""
        ctx.fail(node, key, f"must be a string, got {_shown(node)}{hint}")
    return value


def _secret(node: yaml.Node, key: str, ctx: _Context) -> str:
    """
    A string that must never be shown, not even when it is refused.
    """
    if not isinstance(node, yaml.ScalarNode) or node.tag != _STR:
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
        if isinstance(node, yaml.ScalarNode):
            kind = "a value of another type (quote it to make it a string)"
        ctx.fail(node, key, f"must be a string, got {kind}; the value is not shown")
    value: str = node.value
    if value and ctx.mode is not None and ctx.mode & 0o044:
        ctx.warn(
            node,
            key,
            f"the file is readable by group or others (mode {ctx.mode:04o}):"
            f" chmod 600 {ctx.path}, or give the key in NGROK_API_KEY",
        )
    return value


def _name(node: yaml.Node, key: str, ctx: _Context) -> str:
    value = _string(node, key, ctx)
    if not value:
        ctx.fail(node, key, "must not be empty")
    return value


def _path(node: yaml.Node, key: str, ctx: _Context) -> str:
    """
    A file or directory; a relative one is relative to the config's directory.
    """
    value = _name(node, key, ctx)
    if "\0" in value:
        ctx.fail(node, key, f"must be a path, got {value!r}")
    return os.path.join(os.path.dirname(ctx.path), value)


def _optional_path(node: yaml.Node, key: str, ctx: _Context) -> str | None:
    return _path(node, key, ctx) if _string(node, key, ctx) else None


def _seconds(node: yaml.Node, key: str, ctx: _Context) -> float:
    value = ctx.value(node, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        ctx.fail(node, key, f"must be a positive number of seconds, got {_shown(node)}")
    if not value <= _MAX_SECONDS:
        ctx.fail(node, key, f"must be at most {_MAX_SECONDS:g} seconds, got {value}")
    return float(value)


def _days(node: yaml.Node, key: str, ctx: _Context) -> float:
    value = ctx.value(node, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        ctx.fail(node, key, f"must be a number of days, 0 or more, got {_shown(node)}")
    if not value <= _MAX_DAYS:
        ctx.fail(node, key, f"must be at most {_MAX_DAYS} days, got {value}")
    return float(value)


def _delay(node: yaml.Node, key: str, ctx: _Context) -> float:
    value = ctx.value(node, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        ctx.fail(
            node, key, f"must be a number of seconds, 0 or more, got {_shown(node)}"
        )
    if not value <= _MAX_SECONDS:
        ctx.fail(node, key, f"must be at most {_MAX_SECONDS:g} seconds, got {value}")
    return float(value)


def _poll_interval(node: yaml.Node, key: str, ctx: _Context) -> float:
    value = _seconds(node, key, ctx)
    if value < 5:
        ctx.warn(node, key, f"polling every {value:g}s may hit ngrok API rate limits")
    return value


def _port(node: yaml.Node, key: str, ctx: _Context) -> int:
    value = ctx.value(node, key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        ctx.fail(node, key, f"must be a port number 1..65535, got {_shown(node)}")
    return value


def _whole(node: yaml.Node, key: str, ctx: _Context, low: int, high: int) -> int:
    value = ctx.value(node, key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        ctx.fail(node, key, f"must be a whole number {low}..{high}, got {_shown(node)}")
    return value


def _count(node: yaml.Node, key: str, ctx: _Context) -> int:
    return _whole(node, key, ctx, 1, _MAX_COUNT)


def _size(node: yaml.Node, key: str, ctx: _Context) -> int:
    return _whole(node, key, ctx, 0, _MAX_POOL)


def _count_or_none(node: yaml.Node, key: str, ctx: _Context) -> int:
    return _whole(node, key, ctx, 0, _MAX_COUNT)


def _bool(node: yaml.Node, key: str, ctx: _Context) -> bool:
    value = ctx.value(node, key)
    if not isinstance(value, bool):
        ctx.fail(node, key, f"must be true or false, got {_shown(node)}")
    return value


def _insecure(node: yaml.Node, key: str, ctx: _Context) -> bool:
    value = _bool(node, key, ctx)
    if value:
        ctx.warn(node, key, "the binding ingress's certificate will NOT be verified")
    return value


def _log_level(node: yaml.Node, key: str, ctx: _Context) -> str:
    value = ctx.value(node, key)
    if not isinstance(value, str) or value.lower() not in _LOG_LEVELS:
        levels = ", ".join(sorted(_LOG_LEVELS))
        ctx.fail(node, key, f"must be one of {levels}; got {_shown(node)}")
    return "warn" if value.lower() == "warning" else value.lower()


def _log_format(node: yaml.Node, key: str, ctx: _Context) -> str:
    value = ctx.value(node, key)
    if value not in _LOG_FORMATS:
        ctx.fail(node, key, f"must be text or json; got {_shown(node)}")
    return str(value)


#: Twisted server endpoint types a socket_path may name instead of a path.
_ENDPOINT_TYPES = ("unix:", "systemd:", "tcp:", "tcp6:")


def _socket(node: yaml.Node, key: str, ctx: _Context) -> str:
    """
    A path for the control socket, or a Twisted server endpoint description
    (C{systemd:domain=UNIX:index=0} for socket activation).
    """
    value = _name(node, key, ctx)
    if value.startswith(_ENDPOINT_TYPES):
        return value
    return _path(node, key, ctx)


def _interface_name(node: yaml.Node, key: str, ctx: _Context) -> str:
    value = _name(node, key, ctx)
    if len(value) > 15 or "/" in value or any(c.isspace() for c in value):
        ctx.fail(
            node,
            key,
            "must be an interface name of at most 15 characters without '/' "
            f"or spaces, got {value!r}",
        )
    return value


def _instance_name(node: yaml.Node, key: str, ctx: _Context) -> str:
    value = _string(node, key, ctx)
    try:
        return _instance.check_name(value)
    except _instance.InstanceNameError as e:
        ctx.fail(node, key, str(e))


def _is_mode(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return value == "virtual"
    return True


def _mode(node: yaml.Node, key: str, ctx: _Context) -> str:
    value = _string(node, key, ctx)
    if not _is_mode(value):
        ctx.fail(
            node,
            key,
            f"must be virtual, 0.0.0.0, :: or an IP address, got {_shown(node)}",
        )
    return value


def _subnet(node: yaml.Node, key: str, ctx: _Context) -> _IPNetwork:
    value = _string(node, key, ctx)
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
        isinstance(subnet, ipaddress.IPv4Network) and subnet.subnet_of(_DARWIN_SUBNET)
    ):
        ctx.warn(
            node,
            key,
            f"macOS virtual mode needs addresses in {_DARWIN_SUBNET}; "
            f"{subnet} is outside it",
        )
    return subnet


_N = TypeVar("_N", bound=_IPNetwork)


def _block(
    node: yaml.Node,
    key: str,
    ctx: _Context,
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


def _subnet6(node: yaml.Node, key: str, ctx: _Context) -> ipaddress.IPv6Network | str:
    """
    C{auto}, C{""} (no IPv6 addresses) or an IPv6 block; macOS has none.
    """
    value = _string(node, key, ctx).strip()
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


def _selectors(node: yaml.Node, key: str, ctx: _Context) -> tuple[str, ...]:
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(node, key, f"must be a list of strings, got {_shown(node)}")
    return tuple(_name(item, f"{key}[{i}]", ctx) for i, item in enumerate(node.value))


def _hostnames(node: yaml.Node, key: str, ctx: _Context) -> tuple[str, ...]:
    """
    Bare host names (no port, scheme or path), lowercased.
    """
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(node, key, f"must be a list of host names, got {_shown(node)}")
    names = []
    for i, item in enumerate(node.value):
        name = _name(item, f"{key}[{i}]", ctx)
        if any(c in name for c in " /:[]@"):
            ctx.fail(item, f"{key}[{i}]", f"must be a bare host name, got {name!r}")
        names.append(name.lower().rstrip("."))
    return tuple(names)


def _domains(node: yaml.Node, key: str, ctx: _Context) -> tuple[str, ...]:
    """
    DNS domains, lowercased, without a leading or final dot, each once.
    """
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(node, key, f"must be a list of domains, got {_shown(node)}")
    domains: dict[str, None] = {}
    for i, item in enumerate(node.value):
        where = f"{key}[{i}]"
        value = _name(item, where, ctx)
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


def _overrides(node: yaml.Node, key: str, ctx: _Context) -> dict[str, str]:
    """
    Hostname to listen mode; the hostname is bare, as in the endpoint's URL.
    """
    overrides = {}
    for host_node, mode_node in _pairs(node, key, ctx):
        host = host_node.value
        if host_node.tag != _STR or not host or any(c in host for c in " /:"):
            ctx.fail(
                host_node,
                key,
                f"keys must be bare hostnames, got {_shown(host_node)}",
            )
        overrides[host] = _mode(mode_node, f"{key}.{host}", ctx)
    return overrides


def _ingress_endpoint(node: yaml.Node, key: str, ctx: _Context) -> str:
    """
    C{host[:port]} or C{[ipv6][:port]}, normalised to C{host:port}.
    """
    value = _name(node, key, ctx)
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


def _listen_address(node: yaml.Node, key: str, ctx: _Context) -> str:
    """
    C{address:port} or C{[ipv6]:port} to listen on, normalised; C{""} stays
    C{""} (off).
    """
    value = _string(node, key, ctx).strip()
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


def _dns_mode(node: yaml.Node, key: str, ctx: _Context) -> str:
    value = ctx.value(node, key)
    if value is False:
        return "off"  # YAML 1.1 reads a bare off as false
    if not isinstance(value, str) or value.lower() not in DNS_MODES:
        modes = ", ".join(DNS_MODES)
        ctx.fail(node, key, f"must be one of {modes}; got {_shown(node)}")
    return value.lower()


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


def _dns_listen(node: yaml.Node, key: str, ctx: _Context) -> str:
    """
    Where the DNS server listens, C{address[:port]} (port 53 by default);
    C{""}: chosen by the mode (see L{DnsConfig.listen}).
    """
    value = _string(node, key, ctx).strip()
    if not value:
        return ""
    try:
        return _dns_server(value, 53)
    except ValueError as e:
        ctx.fail(node, key, f"{e}, like 10.107.0.1:53; got {value!r}")


def _dns_upstreams(node: yaml.Node, key: str, ctx: _Context) -> tuple[str, ...]:
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(node, key, f"must be a list of addresses, got {_shown(node)}")
    servers: dict[str, None] = {}
    for i, item in enumerate(node.value):
        where = f"{key}[{i}]"
        value = _name(item, where, ctx).strip()
        try:
            servers[_dns_server(value, 53)] = None
        except ValueError as e:
            ctx.fail(item, where, f"{e}, like 192.0.2.53 or [2001:db8::53]:53")
    return tuple(servers)


def _api_url(node: yaml.Node, key: str, ctx: _Context) -> str:
    value = _name(node, key, ctx)
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as e:
        ctx.fail(node, key, f"must be an http(s)://host URL, got {value!r}: {e}")
    if (
        url.scheme not in ("http", "https")
        or not url.hostname
        or url.query
        or url.fragment
    ):
        ctx.fail(node, key, f"must be an http(s)://host URL, got {value!r}")
    return value.rstrip("/")


#: Every key: its check, and its default (None: computed in L{parse_config},
#: or, for C{server.idle_timeout}, none).
_FIELDS: dict[str, tuple[_Check, object]] = {
    "api.url": (_api_url, "https://api.ngrok.com"),
    "api.key": (_secret, ""),
    "api.ca_bundle": (_optional_path, None),
    "api.timeout": (_seconds, 30.0),
    "api.reregister_if_deleted": (_bool, False),
    "ingressEndpoint": (_ingress_endpoint, "kubernetes-binding-ingress.ngrok.io:443"),
    "ingress.ca_bundle": (_optional_path, None),
    "ingress.insecure_skip_verify": (_insecure, False),
    "ingress.connect_timeout": (_seconds, 10.0),
    "ingress.upgrade_timeout": (_seconds, 10.0),
    "ingress.max_pending_dials": (_count, 100),
    "ingress.dial_queue_timeout": (_seconds, 60.0),
    "ingress.pool_size": (_size, 16),
    "ingress.pool_idle_timeout": (_seconds, 30.0),
    "ingress.pool_max_age": (_seconds, 20.0),
    "ingress.pool_linger": (_seconds, 300.0),
    "ingress.early_data": (_bool, True),
    "server.log_level": (_log_level, "info"),
    "server.log_format": (_log_format, "text"),
    "server.instance": (_instance_name, ""),
    "server.socket_path": (_socket, None),
    "server.socket_group": (_string, ""),
    "server.admin_group": (_string, ""),
    "server.state_dir": (_path, None),
    "server.client_cert": (_path, None),
    "server.client_key": (_path, None),
    "server.renew_before_days": (_days, 30.0),
    "server.health_address": (_listen_address, "127.0.0.1:8081"),
    "server.web_hosts": (_hostnames, ()),
    "server.shutdown_grace": (_seconds, 30.0),
    "server.idle_timeout": (_seconds, None),
    "server.metrics_per_endpoint": (_count_or_none, 10000),
    "bound_endpoints.poll_interval": (_poll_interval, 30.0),
    "bound_endpoints.selectors": (_selectors, ("true",)),
    "bound_endpoints.max_endpoints": (_count, 10000),
    "bound_endpoints.poll_timeout": (_seconds, 120.0),
    "net.interface_name": (_interface_name, None),
    "net.subnet": (_subnet, None),
    "net.listen_interface": (_mode, "virtual"),
    "net.start_port": (_port, 9080),
    "net.overrides": (_overrides, {}),
    "net.hosts_file": (_path, "/etc/hosts"),
    "net.reuse_after": (_delay, 3600.0),
    "net.allowed_domains": (_domains, ()),
    "dns.mode": (_dns_mode, "auto"),
    "dns.listen": (_dns_listen, ""),
    "dns.upstreams": (_dns_upstreams, ()),
    "net.subnet6": (_subnet6, None),
}
_SECTIONS = {key.partition(".")[0] for key in _FIELDS if "." in key}


def _join(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _pairs(
    node: yaml.Node, key: str, ctx: _Context
) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    """
    The key and value nodes of a mapping, refusing duplicate and merge keys.
    """
    if not isinstance(node, yaml.MappingNode):
        ctx.fail(node, key, f"must be a mapping, got {_shown(node)}")
    lines: dict[str, int] = {}
    for name_node, _ in node.value:
        if not isinstance(name_node, yaml.ScalarNode) or name_node.tag == _MERGE:
            ctx.fail(name_node, key, "keys must be plain names (no lists or << merges)")
        name = name_node.value
        if name in lines:
            ctx.fail(
                name_node,
                _join(key, name),
                f"duplicate key (first on line {lines[name]})",
            )
        lines[name] = name_node.start_mark.line + 1
    pairs: list[tuple[yaml.ScalarNode, yaml.Node]] = node.value
    return pairs


def _suggestion(name: str, section: str) -> str | None:
    """
    A hint for an unknown key: what replaced it, or the closest known key at
    the same level, else anywhere.
    """
    if name in _RETIRED:
        return _RETIRED[name]
    everything = [*_FIELDS, *sorted(_SECTIONS)]
    here = [k for k in everything if k.rpartition(".")[0] == section]
    for pool in (here, everything):
        leaves = {k.rpartition(".")[2]: k for k in pool}
        close = difflib.get_close_matches(name, list(leaves), n=1)
        if close:
            return f"did you mean {leaves[close[0]]}?"
    return None


def _read(root: yaml.Node, ctx: _Context) -> dict[str, Any]:
    """
    Every known key present (and not null) in the document, checked, by
    dotted name; unknown keys become warnings.
    """
    if not isinstance(root, yaml.MappingNode):
        ctx.fail(
            root, "", f"the file must be a mapping of settings, got {_shown(root)}"
        )
    found: dict[str, Any] = {}
    unknown = 0

    def take(section: str, name_node: yaml.ScalarNode, value_node: yaml.Node) -> None:
        nonlocal unknown
        key = _join(section, name_node.value)
        if key not in _FIELDS or key.rpartition(".")[0] != section:
            unknown += 1
            if unknown <= _MAX_UNKNOWN:
                hint = _suggestion(name_node.value, section)
                message = "unknown key, ignored" + (f" ({hint})" if hint else "")
                ctx.warn(name_node, key, message)
        elif value_node.tag != _NULL:
            found[key] = _FIELDS[key][0](value_node, key, ctx)
            ctx.locations[key] = ctx._where(name_node, key)

    for name_node, value_node in _pairs(root, "", ctx):
        section = name_node.value
        if section not in _SECTIONS:
            take("", name_node, value_node)
        elif value_node.tag != _NULL:
            for pair in _pairs(value_node, section, ctx):
                take(section, *pair)
    if unknown > _MAX_UNKNOWN:
        ctx.warn(root, "", f"{unknown - _MAX_UNKNOWN} more unknown keys, ignored")
    return found


def parse_config(
    text: str,
    path: str,
    environ: Mapping[str, str],
    platform: str,
    mode: int | None = None,
    instance: str | None = None,
) -> LoadedConfig:
    """
    The configuration in C{text}, the contents of the file at C{path}.

    A key that is absent or null takes its default. C{NGROK_API_KEY} in
    C{environ} is the API key when the file gives none; C{NGROKD_HOSTS_PATH}
    replaces C{net.hosts_file}. C{platform} is a C{sys.platform} value: on
    C{"darwin"} the default subnet is 127.0.0.0/8. C{mode}, the file's
    permission bits, makes an API key in a file others can read a warning.
    C{instance}, the C{--instance} option, replaces C{server.instance}; a
    named instance derives the defaults in L{ngrokd.instance} and must set
    the numbers it uses (L{_own_numbers}).

    @raise ConfigError: naming the file, line and key of the first bad value.
    """
    if instance is not None:
        try:
            _instance.check_name(instance)
        except _instance.InstanceNameError as e:
            raise ConfigError(f"--instance: {e}") from None
    ctx = _Context(path, platform, mode)
    if len(text) > MAX_CONFIG_SIZE:
        raise _too_large(path)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except _TooDeep as e:
        where = f"{path}:{e.line}: {e.key}" if e.key else f"{path}:{e.line}"
        raise ConfigError(
            f"{where}: nested more than {MAX_DEPTH} levels deep"
        ) from None
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 1
        context = f" ({e.context})" if e.context else ""
        raise ConfigError(
            f"{path}:{line}: not valid YAML: {e.problem}{context}"
        ) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        problem = f"character #x{e.character:04x}: {e.reason}"
        raise ConfigError(f"{path}:{line}: not valid YAML: {problem}") from None
    found = {} if root is None else _read(root, ctx)

    def get(key: str) -> Any:
        return found[key] if key in found else _FIELDS[key][1]

    def section(cls: type, name: str, **given: object) -> Any:
        names = (f.name for f in attrs.fields(cls))
        return cls(**{n: given[n] if n in given else get(f"{name}.{n}") for n in names})

    name = get("server.instance") if instance is None else instance
    # The original's rule: the certificate's directory is the state directory.
    client_cert = found.get("server.client_cert")
    state_dir = found.get("server.state_dir") or (
        os.path.dirname(client_cert) if client_cert else _instance.state_dir(name)
    )
    default_subnet = _DARWIN_SUBNET if platform == "darwin" else _DEFAULT_SUBNET
    _own_numbers(path, name, found, default_subnet)
    config = Config(
        path=path,
        api=section(
            ApiConfig,
            "api",
            key=get("api.key") or environ.get("NGROK_API_KEY", ""),
        ),
        ingress=section(IngressConfig, "ingress", endpoint=get("ingressEndpoint")),
        server=section(
            ServerConfig,
            "server",
            instance=name,
            socket_path=found.get("server.socket_path") or _instance.socket_path(name),
            state_dir=state_dir,
            client_cert=client_cert or os.path.join(state_dir, "tls.crt"),
            client_key=found.get("server.client_key")
            or os.path.join(state_dir, "tls.key"),
        ),
        bound_endpoints=section(DiscoveryConfig, "bound_endpoints"),
        net=section(
            NetConfig,
            "net",
            interface_name=found.get("net.interface_name") or _interface_of(path, name),
            subnet=found.get("net.subnet", default_subnet),
            subnet6=_effective_subnet6(ctx, found, default_subnet),
            hosts_file=environ.get("NGROKD_HOSTS_PATH") or get("net.hosts_file"),
        ),
        dns=section(DnsConfig, "dns"),
    )
    _check_dns_listen(ctx, config)
    return LoadedConfig(config, tuple(ctx.warnings), ctx.locations)


def _check_dns_listen(ctx: _Context, config: Config) -> None:
    """
    Refuse a C{dns.listen} address that endpoints may be given: inside
    C{net.subnet}, only its first host is kept for the DNS server.
    """
    listen = config.dns.listen
    if not listen:
        return
    subnet = config.net.subnet
    address = ipaddress.ip_address(listen.rpartition(":")[0].strip("[]"))
    first = subnet.network_address + 1
    if address in subnet and address != first:
        where = ctx.locations.get("dns.listen", f"{ctx.path}: dns.listen")
        raise ConfigError(
            f"{where}: {address} is in net.subnet {subnet}, whose addresses go to"
            f" endpoints: use {first} (kept for the DNS server) or an address"
            " outside it"
        )


def _effective_subnet6(
    ctx: _Context, found: Mapping[str, Any], default_subnet: _IPNetwork
) -> ipaddress.IPv6Network | str:
    """
    C{net.subnet6}, or its default (L{SUBNET6_AUTO}); none on macOS (IPv4
    only) and where C{net.subnet} gives IPv6 addresses already.
    """
    subnet = found.get("net.subnet", default_subnet)
    value: ipaddress.IPv6Network | str = found.get("net.subnet6", SUBNET6_AUTO)
    if ctx.platform == "darwin" or value == SUBNET6_OFF or subnet.version == 4:
        return SUBNET6_OFF if ctx.platform == "darwin" else value
    if "net.subnet6" in found:
        raise ConfigError(
            f"{ctx.locations['net.subnet6']}: net.subnet {subnet} gives IPv6"
            ' addresses already; set net.subnet6 to "" or net.subnet to an'
            " IPv4 block"
        )
    return SUBNET6_OFF


def _interface_of(path: str, name: str) -> str:
    """
    The interface instance C{name} derives, refused when it cannot fit.
    """
    interface = _instance.interface_name(name)
    if interface is None:
        fits = _instance.MAX_INTERFACE_NAME - len("ngrokd-")
        raise ConfigError(
            f"{path}: net.interface_name: instance {name!r} would use the"
            f" interface ngrokd-{name}, longer than Linux's"
            f" {_instance.MAX_INTERFACE_NAME} characters: set net.interface_name,"
            f" or use an instance name of at most {fits} characters"
        )
    return interface


def _own_numbers(
    path: str, name: str, found: Mapping[str, Any], default_subnet: _IPNetwork
) -> None:
    """
    Refuse a named instance that leaves to its default a number the unnamed
    instance uses: the health address always, the subnet when an endpoint
    may listen in virtual mode, the first port when one may listen on a
    network address. No number derived from a name could keep any two
    names apart.
    """
    if not name:
        return
    modes = {found.get("net.listen_interface", "virtual")}
    modes.update(found.get("net.overrides", {}).values())
    needed = {"server.health_address": (_FIELDS["server.health_address"][1], "")}
    if "virtual" in modes:
        needed["net.subnet"] = (default_subnet, " in virtual mode")
    if modes != {"virtual"}:
        needed["net.start_port"] = (_FIELDS["net.start_port"][1], " in network mode")
    for key, (default, when) in needed.items():
        if key not in found:
            off = ', or "" for none' if key == "server.health_address" else ""
            raise ConfigError(
                f"{path}: {key}: instance {name!r} must set its own{when}"
                f"{off}: the default, {default}, is the unnamed instance's"
            )


def _too_large(path: str) -> ConfigError:
    return ConfigError(
        f"{path}: larger than {MAX_CONFIG_SIZE} characters; a config file"
        " holds a few settings"
    )


def default_config(
    path: str, environ: Mapping[str, str], platform: str
) -> LoadedConfig:
    """
    The configuration of an empty file at C{path}.
    """
    return parse_config("", path, environ, platform)


def load_config(
    path: str,
    environ: Mapping[str, str] = os.environ,
    platform: str = sys.platform,
    instance: str | None = None,
) -> LoadedConfig:
    """
    Read and parse the file at C{path} (made absolute, so that relative paths
    in it stay right if the process changes directory), as instance
    C{instance} when given (see L{parse_config}).

    @raise ConfigError: the file cannot be read, or see L{parse_config}.
    """
    path = os.path.abspath(path)
    # A character is at most 4 bytes of UTF-8: more is over the limit.
    most = 4 * MAX_CONFIG_SIZE
    try:
        data, status = read_regular(path, most + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}")
    if len(data) > most:
        raise _too_large(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}")
    mode = stat.S_IMODE(status.st_mode)
    loaded = parse_config(text, path, environ, platform, mode, instance)
    check_ca_bundles(loaded)
    return loaded


def check_ca_bundles(loaded: LoadedConfig) -> None:
    """
    Refuse a CA bundle the config names but that cannot be read or holds
    no certificate, naming the file, line and key, as any other bad value.
    """
    config = loaded.config
    for key, path in (
        ("api.ca_bundle", config.api.ca_bundle),
        ("ingress.ca_bundle", config.ingress.ca_bundle),
    ):
        if not path:
            continue
        try:
            pem, _ = read_regular(path, MAX_BUNDLE + 1)
        except OSError as e:
            raise ConfigError(
                f"{loaded.where(key)}: cannot read {path}: {e.strerror or e}"
            ) from None
        if len(pem) > MAX_BUNDLE:
            raise ConfigError(
                f"{loaded.where(key)}: {path} is larger than"
                f" {MAX_BUNDLE // 2**20} MiB: not a CA bundle"
            )
        try:
            parse_certificates(pem, path)
        except PEMError as e:
            raise ConfigError(f"{loaded.where(key)}: {e}") from None
