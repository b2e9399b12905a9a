# -*- test-case-name: ngrokd.test.test_instance -*-
"""
The values a file leaves to be derived, and the rules that hold across
keys.

Some defaults are not constants: the state directory, the socket and the
interface follow the instance's name (L{ngrokd.instance}), the subnet and
IPv6 follow the platform, the API key and the hosts file may come from the
environment. A named instance must set the numbers the unnamed one uses,
and the DNS server's address must not be one an endpoint may be given.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Any

from ngrokd import instance as _instance
from ngrokd.config.addresses import (
    DARWIN_SUBNET,
    SUBNET6_OFF,
    IPNetwork,
)
from ngrokd.config.context import ConfigError, Context
from ngrokd.config.schema import SETTINGS, Config

_DEFAULT_SUBNET = ipaddress.ip_network("10.107.0.0/16")


def derive(
    ctx: Context,
    found: Mapping[str, Any],
    environ: Mapping[str, str],
    instance: str | None,
) -> dict[str, object]:
    """
    The values, by key, that replace what the file gives in C{found}, or
    stand for what it leaves out, when it runs as the instance named
    C{instance} (the C{--instance} option; C{None}: C{server.instance}).

    @raise ConfigError: a named instance that leaves a number to the
        unnamed one's default, an interface name the instance's name
        makes too long, or an IPv6 block where C{net.subnet} gives IPv6.
    """

    def get(key: str) -> Any:
        return found[key] if key in found else _default(key)

    name = get("server.instance") if instance is None else instance
    # The original's rule: the certificate's directory is the state directory.
    client_cert = found.get("server.client_cert")
    state_dir = found.get("server.state_dir") or (
        os.path.dirname(client_cert) if client_cert else _instance.state_dir(name)
    )
    default_subnet = DARWIN_SUBNET if ctx.platform == "darwin" else _DEFAULT_SUBNET
    _own_numbers(ctx.path, name, found, default_subnet)
    return {
        "api.key": get("api.key") or environ.get("NGROK_API_KEY", ""),
        "server.instance": name,
        "server.socket_path": found.get("server.socket_path")
        or _instance.socket_path(name),
        "server.state_dir": state_dir,
        "server.client_cert": client_cert or os.path.join(state_dir, "tls.crt"),
        "server.client_key": found.get("server.client_key")
        or os.path.join(state_dir, "tls.key"),
        "net.interface_name": found.get("net.interface_name")
        or _interface_of(ctx.path, name),
        "net.subnet": found.get("net.subnet", default_subnet),
        "net.subnet6": _effective_subnet6(ctx, found, default_subnet),
        "net.hosts_file": environ.get("NGROKD_HOSTS_PATH") or get("net.hosts_file"),
    }


def check_dns_listen(ctx: Context, config: Config) -> None:
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
    ctx: Context, found: Mapping[str, Any], default_subnet: IPNetwork
) -> ipaddress.IPv6Network | str:
    """
    C{net.subnet6}, or its default
    (L{ngrokd.config.addresses.SUBNET6_AUTO}); none on macOS (IPv4 only)
    and where C{net.subnet} gives IPv6 addresses already.
    """
    subnet = found.get("net.subnet", default_subnet)
    value: ipaddress.IPv6Network | str = found.get(
        "net.subnet6", _default("net.subnet6")
    )
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
    path: str, name: str, found: Mapping[str, Any], default_subnet: IPNetwork
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
    modes = {found.get("net.listen_interface", _default("net.listen_interface"))}
    modes.update(found.get("net.overrides", {}).values())
    needed = {"server.health_address": (_default("server.health_address"), "")}
    if "virtual" in modes:
        needed["net.subnet"] = (default_subnet, " in virtual mode")
    if modes != {"virtual"}:
        needed["net.start_port"] = (_default("net.start_port"), " in network mode")
    for key, (default, when) in needed.items():
        if key not in found:
            off = ', or "" for none' if key == "server.health_address" else ""
            raise ConfigError(
                f"{path}: {key}: instance {name!r} must set its own{when}"
                f"{off}: the default, {default}, is the unnamed instance's"
            )


def _default(key: str) -> Any:
    return SETTINGS[key].default
