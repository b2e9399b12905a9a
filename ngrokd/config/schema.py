# -*- test-case-name: ngrokd.test.test_config -*-
"""
The settings as frozen values, one class per section of the file, and
L{SETTINGS}, every key of the file read from those classes.

Each key is declared once, as a field of its section: the field's type and
default are the value's, and its metadata (L{read}) names the check that
reads it from the file, whether a reload applies it at once, and its name
in the file when that is not C{section.field}. Adding a key is adding a
field here, and its entry in C{docs/configuration.rst} and
C{contrib/config.yml}; the loader, the reload and the tests follow.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from types import MappingProxyType

import attrs
from attrs import NOTHING, field, frozen

from ngrokd.config import addresses, values
from ngrokd.config.addresses import SUBNET6_AUTO, IPNetwork
from ngrokd.config.context import Check

_KEY = "ngrokd.config.key"


@frozen
class _Key:
    """
    What a field's metadata says of its key (see L{read}).
    """

    check: Check
    default: object
    hot: bool
    name: str | None


def read(
    check: Check,
    *,
    default: object = NOTHING,
    hot: bool = False,
    name: str | None = None,
) -> Mapping[str, object]:
    """
    The metadata of a section's field that is a key of the file.

    @param check: reads the key's value node (see L{ngrokd.config.values}).
    @param default: the value of an absent key, for a field whose class
        requires it (the others' default is the field's); none for a value
        derived from others, the instance or the platform
        (L{ngrokd.config.derived}).
    @param hot: a reload applies the key at once (see L{ngrokd.reconfigure}).
    @param name: the key's dotted name in the file, when not C{section.field}.
    """
    return {_KEY: _Key(check, default, hot, name)}


def _frozen_mapping(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@frozen
class ApiConfig:
    """
    How to reach the ngrok API.
    """

    url: str = field(
        metadata=read(values.api_url, default="https://api.ngrok.com", hot=True)
    )
    #: Never shown: not in the repr, nor in an error about its value.
    key: str = field(repr=False, metadata=read(values.secret, default="", hot=True))
    ca_bundle: str | None = field(
        metadata=read(values.optional_path, default=None, hot=True)
    )
    #: Seconds allowed for one API request.
    timeout: float = field(default=30.0, metadata=read(values.seconds, hot=True))
    #: Register a new operator by itself when ngrok no longer has ours.
    reregister_if_deleted: bool = field(
        default=False, metadata=read(values.boolean, hot=True)
    )


@frozen
class IngressConfig:
    """
    How to reach ngrok's binding ingress; C{endpoint} is always C{host:port}
    (an IPv6 host in brackets).
    """

    endpoint: str = field(
        metadata=read(
            addresses.ingress_endpoint,
            default="kubernetes-binding-ingress.ngrok.io:443",
            name="ingressEndpoint",
        )
    )
    ca_bundle: str | None = field(
        metadata=read(values.optional_path, default=None, hot=True)
    )
    insecure_skip_verify: bool = field(metadata=read(values.insecure, default=False))
    connect_timeout: float = field(
        metadata=read(values.seconds, default=10.0, hot=True)
    )
    upgrade_timeout: float = field(
        metadata=read(values.seconds, default=10.0, hot=True)
    )
    #: Dials (TCP, TLS, upgrade) in progress at once; the others queue.
    max_pending_dials: int = field(default=100, metadata=read(values.count))
    #: Seconds a connection may wait in that queue.
    dial_queue_timeout: float = field(default=60.0, metadata=read(values.seconds))
    #: The most connections kept ready (TLS done, no request yet); 0: none.
    pool_size: int = field(default=16, metadata=read(values.size, hot=True))
    #: Seconds without an accepted connection after which none are kept.
    pool_idle_timeout: float = field(
        default=30.0, metadata=read(values.seconds, hot=True)
    )
    #: Seconds a ready connection is kept before it is replaced.
    pool_max_age: float = field(default=20.0, metadata=read(values.seconds, hot=True))
    #: Seconds after the last accepted connection during which one is kept
    #: ready where a handshake is worth saving; none after.
    pool_linger: float = field(default=300.0, metadata=read(values.seconds, hot=True))
    #: Send a client's first bytes right behind the request, before the
    #: ingress answers.
    early_data: bool = field(default=True, metadata=read(values.boolean, hot=True))

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

    log_level: str = field(metadata=read(values.log_level, default="info", hot=True))
    socket_path: str = field(metadata=read(values.socket))
    state_dir: str = field(metadata=read(values.path))
    client_cert: str = field(metadata=read(values.path))
    client_key: str = field(metadata=read(values.path))
    #: Renew the client certificate this many days before it expires.
    renew_before_days: float = field(default=30.0, metadata=read(values.days, hot=True))
    #: C{address:port} (an IPv6 address in brackets) of the health and
    #: metrics HTTP server; C{""}: no such server.
    health_address: str = field(
        default="127.0.0.1:8081", metadata=read(addresses.listen_address)
    )
    #: The group that owns the control socket ("": the daemon's own).
    socket_group: str = field(default="", metadata=read(values.string))
    #: The group whose members may run commands that change the daemon.
    admin_group: str = field(default="", metadata=read(values.string))
    #: Host names, besides C{localhost} and IP addresses, that the web page
    #: answers to (its defence against DNS rebinding).
    web_hosts: tuple[str, ...] = field(default=(), metadata=read(addresses.hostnames))
    #: The instance's name (C{""}: the unnamed one); see L{ngrokd.instance}.
    instance: str = field(default="", metadata=read(values.instance_name))
    #: Seconds open connections have to finish when the daemon stops.
    shutdown_grace: float = field(default=30.0, metadata=read(values.seconds, hot=True))
    #: Reset a connection on which nothing moved for this long (None: never).
    idle_timeout: float | None = field(default=None, metadata=read(values.seconds))
    #: Endpoints with series of their own in C{/metrics} (0: none).
    metrics_per_endpoint: int = field(
        default=10000, metadata=read(values.count_or_none, hot=True)
    )
    #: How the log is written: C{text} or C{json} lines.
    log_format: str = field(default="text", metadata=read(values.log_format))


@frozen
class DiscoveryConfig:
    """
    How bound endpoints are discovered.
    """

    poll_interval: float = field(
        metadata=read(values.poll_interval, default=30.0, hot=True)
    )
    selectors: tuple[str, ...] = field(
        metadata=read(values.selectors, default=("true",), hot=True)
    )
    #: More endpoints than this in one poll fail the poll.
    max_endpoints: int = field(default=10000, metadata=read(values.count, hot=True))
    #: Seconds allowed for one whole poll, every page included.
    poll_timeout: float = field(default=120.0, metadata=read(values.seconds, hot=True))


@frozen
class NetConfig:
    """
    Where discovered endpoints listen locally.
    """

    interface_name: str = field(metadata=read(values.interface_name))
    subnet: IPNetwork = field(metadata=read(addresses.subnet))
    listen_interface: str = field(
        metadata=read(addresses.listen_mode, default="virtual", hot=True)
    )
    start_port: int = field(metadata=read(addresses.port, default=9080, hot=True))
    overrides: Mapping[str, str] = field(
        converter=_frozen_mapping,
        hash=False,
        metadata=read(addresses.overrides, default={}, hot=True),
    )
    hosts_file: str = field(metadata=read(values.path, default="/etc/hosts"))
    #: Seconds an address or port given up is kept from other endpoints.
    reuse_after: float = field(default=3600.0, metadata=read(values.delay, hot=True))
    #: The domains virtual-mode names must be in, lowercase (empty: any).
    allowed_domains: tuple[str, ...] = field(
        default=(), metadata=read(addresses.domains, hot=True)
    )
    #: Where each virtual-mode name's IPv6 address comes from: a block,
    #: L{SUBNET6_AUTO} (derived in the state directory) or L{SUBNET6_OFF}.
    subnet6: ipaddress.IPv6Network | str = field(
        default=SUBNET6_AUTO, metadata=read(addresses.subnet6)
    )


@frozen
class DnsConfig:
    """
    ngrokd's DNS server, and how the system's resolver is pointed at it.
    """

    #: One of L{DNS_MODES}.
    mode: str = field(default="auto", metadata=read(values.dns_mode, hot=True))
    #: C{address:port} the server listens on; C{""}: the first host of
    #: C{net.subnet}, port 53, in virtual mode, and none in network mode.
    listen: str = field(default="", metadata=read(addresses.dns_listen, hot=True))
    #: C{address:port} servers other names are forwarded to; empty: the
    #: system's own (systemd-resolved's, or C{resolv.conf}'s).
    upstreams: tuple[str, ...] = field(
        default=(), metadata=read(addresses.dns_upstreams, hot=True)
    )


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


@frozen
class Setting:
    """
    One key of the file: where its value is in L{Config}, and what its
    field's L{read} says of it.
    """

    #: The dotted name in the file.
    key: str
    #: The attribute of L{Config} and the attribute of that section.
    section: str
    name: str
    check: Check
    #: The value of an absent key; C{attrs.NOTHING}: derived.
    default: object
    #: A reload applies it at once.
    hot: bool
    #: Never shown (its field is not in the repr).
    secret: bool


def _settings() -> tuple[dict[str, Setting], dict[str, type]]:
    """
    Every key, read from the section classes' fields, and the class of
    each section.
    """
    found: dict[str, Setting] = {}
    classes: dict[str, type] = {}
    for part in attrs.fields(attrs.resolve_types(Config)):
        cls = part.type
        if not (isinstance(cls, type) and attrs.has(cls)):
            continue
        classes[part.name] = cls
        for f in attrs.fields(cls):
            declared: _Key = f.metadata[_KEY]
            name = declared.name or f"{part.name}.{f.name}"
            default = declared.default if f.default is NOTHING else f.default
            secret = not f.repr
            found[name] = Setting(
                name, part.name, f.name, declared.check, default, declared.hot, secret
            )
    return found, classes


#: Every key of the file, by its dotted name, in the order of L{Config}.
SETTINGS: Mapping[str, Setting]
_CLASSES: Mapping[str, type]
SETTINGS, _CLASSES = _settings()


def config_from(path: str, given: Mapping[str, object]) -> Config:
    """
    The configuration of the file at C{path} with the values C{given} by
    key; the other keys take their defaults.
    """
    sections: dict[str, dict[str, object]] = {name: {} for name in _CLASSES}
    for name, setting in SETTINGS.items():
        value = given[name] if name in given else setting.default
        sections[setting.section][setting.name] = value
    built = {name: cls(**sections[name]) for name, cls in _CLASSES.items()}
    return Config(path=path, **built)
