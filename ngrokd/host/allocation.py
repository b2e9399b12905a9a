# -*- test-case-name: ngrokd.test.test_allocation -*-
"""
Which local address each hostname gets, and which network port each endpoint.

Clients reach a bound endpoint in virtual mode by its hostname, so every
hostname needs an address of its own: two hostnames on one address could not
both listen on port 80, and removing one must not take the address from the
other (fault 13 of the original). In network mode endpoints share an address
and are told apart by port, so every C{(hostname, port)} needs a port of its
own (fault 14). Both must stay put across polls and restarts, because
clients, DNS caches and firewall rules remember them.

L{allocate} is a pure function of the previous allocations and of what is
wanted now. L{load} and L{save} keep the result in the state directory, in
the original's files and formats (and read its older port format), so an
upgrade keeps every address. A damaged state file never stops the daemon: it
is moved aside and the allocations start afresh.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from types import MappingProxyType
from typing import Any, TypeVar

from attrs import field, frozen
from twisted.logger import Logger

from ngrokd.atomic import AtomicWriteError, read_if_exists, write_atomic

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
#: A bound endpoint as the allocator sees it: its hostname and URL port.
EndpointKey = tuple[str, int]

#: File names in the state directory (the Go ngrokd's).
IP_MAPPINGS = "ip_mappings.json"
NETWORK_PORTS = "network_ports.json"
#: The state files are not secret; the original wrote them 0644 too.
STATE_FILE_MODE = 0o644
STATE_DIR_MODE = 0o755
MAX_PORT = 65535

_log = Logger()


def _frozen(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(mapping))


@frozen
class Allocations:
    """
    What is allocated: an address per hostname and a network port per
    endpoint.

    @ivar legacy_network_ports: ports read from the original's older
        C{network_ports.json}, which was keyed by hostname alone. The next
        L{allocate} gives each to its hostname's lowest wanted endpoint port
        and returns none of them.
    """

    ips: Mapping[str, IPAddress] = field(factory=dict, converter=_frozen)
    network_ports: Mapping[EndpointKey, int] = field(factory=dict, converter=_frozen)
    legacy_network_ports: Mapping[str, int] = field(factory=dict, converter=_frozen)


@frozen
class AllocationResult:
    """
    The outcome of L{allocate}.

    @ivar errors: why a hostname got no address (keyed by hostname) or an
        endpoint no network port (keyed by C{(hostname, port)}); everything
        else was allocated.
    """

    allocations: Allocations
    errors: Mapping[str | EndpointKey, str] = field(factory=dict, converter=_frozen)


def usable_addresses(subnet: IPNetwork) -> range:
    """
    The integer values of the addresses that can be handed out in C{subnet}:
    from its second host address on (the first, C{.1}, is left to a gateway as
    in the original), without IPv4's broadcast address.
    """
    last = int(subnet.broadcast_address)
    if subnet.version == 4:
        last -= 1
    return range(int(subnet.network_address) + 2, last + 1)


def is_usable(ip: IPAddress, subnet: IPNetwork) -> bool:
    """
    Whether C{ip} is an address L{allocate} could give out in C{subnet}.
    """
    return ip.version == subnet.version and int(ip) in usable_addresses(subnet)


def allocate(
    previous: Allocations,
    wanted_ips: Iterable[str],
    wanted_ports: Iterable[EndpointKey],
    subnet: IPNetwork,
    start_port: int,
) -> AllocationResult:
    """
    Allocate an address to every hostname of C{wanted_ips} and a network port
    to every endpoint of C{wanted_ports}, keeping what C{previous} gave them.

    A hostname keeps its previous address if that address is usable in
    C{subnet}; an endpoint keeps its previous port if it lies between
    C{start_port} and 65535 (so changing either setting moves what no longer
    fits it). What is no longer wanted is released. Newcomers, in sorted
    order, get the lowest free address from C{.2} of C{subnet} and the lowest
    free port from C{start_port}. Should C{previous} give one address (or
    port) to several, the first in sorted order keeps it. So no two hostnames
    ever share an address, no two endpoints a port, and the result depends
    only on the sets wanted, not on their order.

    When the subnet or the port range is full, the hostnames or endpoints
    left over are reported in L{AllocationResult.errors}; all others are
    still allocated.
    """
    errors: dict[str | EndpointKey, str] = {}
    ips = _allocate_ips(previous.ips, set(wanted_ips), subnet, errors)
    ports = _allocate_ports(
        previous.network_ports,
        previous.legacy_network_ports,
        set(wanted_ports),
        start_port,
        errors,
    )
    return AllocationResult(Allocations(ips, ports), errors)


def _allocate_ips(
    previous: Mapping[str, IPAddress],
    wanted: set[str],
    subnet: IPNetwork,
    errors: dict[str | EndpointKey, str],
) -> dict[str, IPAddress]:
    usable = usable_addresses(subnet)
    ips: dict[str, IPAddress] = {}
    used: set[int] = set()
    for hostname in sorted(wanted & previous.keys()):
        ip = previous[hostname]
        if is_usable(ip, subnet) and int(ip) not in used:
            ips[hostname] = ip
            used.add(int(ip))
    make = IPv4Address if subnet.version == 4 else IPv6Address
    handed = _hand_out(wanted - ips.keys(), usable, used)
    for hostname in sorted(wanted - ips.keys()):
        if hostname in handed:
            ips[hostname] = make(handed[hostname])
        else:
            errors[hostname] = (
                f"no address left for {hostname}: all {len(usable)} usable "
                f"addresses of {subnet} are in use"
            )
    return ips


#: What gets a value: a hostname (an address) or an endpoint (a port).
K = TypeVar("K", str, tuple[str, int])


def _hand_out(newcomers: set[K], usable: range, used: set[int]) -> dict[K, int]:
    """
    Give each of C{newcomers}, in sorted order, the lowest value of
    C{usable} not in C{used} (which it extends); those left when C{usable}
    runs out get none.
    """
    handed: dict[K, int] = {}
    candidate = usable.start
    for key in sorted(newcomers):
        while candidate in used:
            candidate += 1
        if candidate not in usable:
            break
        handed[key] = candidate
        used.add(candidate)
    return handed


def _allocate_ports(
    previous: Mapping[EndpointKey, int],
    legacy: Mapping[str, int],
    wanted: set[EndpointKey],
    start_port: int,
    errors: dict[str | EndpointKey, str],
) -> dict[EndpointKey, int]:
    usable = range(start_port, MAX_PORT + 1)
    ports: dict[EndpointKey, int] = {}
    used: set[int] = set()

    def keep(key: EndpointKey, port: int) -> None:
        if port in usable and port not in used:
            ports[key] = port
            used.add(port)

    for key in sorted(wanted & previous.keys()):
        keep(key, previous[key])
    lowest: dict[str, int] = {}
    for hostname, port in sorted(wanted):
        lowest.setdefault(hostname, port)
    for hostname in sorted(legacy.keys() & lowest.keys()):
        key = (hostname, lowest[hostname])
        if key not in ports:
            keep(key, legacy[hostname])
    newcomers = wanted - ports.keys()
    ports.update(_hand_out(newcomers, usable, used))
    for key in sorted(newcomers - ports.keys()):
        errors[key] = (
            f"no network port left for {key[0]}:{key[1]}: all ports from "
            f"{start_port} to {MAX_PORT} are in use"
        )
    return ports


class CorruptStateFile(Exception):
    """
    A state file's content is not what ngrokd writes there.
    """


def encode_ips(ips: Mapping[str, IPAddress]) -> bytes:
    """
    C{ip_mappings.json} as the original wrote it: one object, keys sorted,
    two-space indent, no final newline.
    """
    return _encode({hostname: str(ip) for hostname, ip in ips.items()})


def encode_network_ports(
    ports: Mapping[EndpointKey, int], legacy: Mapping[str, int]
) -> bytes:
    """
    C{network_ports.json}: C{{"hostname:port": network_port}}, plus any
    not yet migrated C{{"hostname": network_port}} of the original.
    """
    content: dict[str, int] = {f"{h}:{p}": n for (h, p), n in ports.items()}
    content.update(legacy)
    return _encode(content)


def _encode(content: Mapping[str, Any]) -> bytes:
    return json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False).encode(
        "utf-8"
    )


def _decode_object(data: bytes) -> dict[str, Any]:
    try:
        content = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptStateFile(f"is not JSON ({e})") from e
    if not isinstance(content, dict):
        raise CorruptStateFile(
            "holds null, not a JSON object"
            if content is None
            else f"holds a JSON {type(content).__name__}, not an object"
        )
    return content


def decode_ips(
    data: bytes, subnet: IPNetwork
) -> tuple[dict[str, IPAddress], list[str]]:
    """
    Read C{ip_mappings.json}. Entries that are not a usable address of
    C{subnet}, or that repeat another hostname's address, are left out; the
    returned warnings say which and why.

    @raise CorruptStateFile: if C{data} is not one JSON object.
    """
    ips: dict[str, IPAddress] = {}
    owners: dict[IPAddress, str] = {}
    warnings: list[str] = []
    for hostname, value in sorted(_decode_object(data).items()):
        try:
            ip = ip_address(value) if isinstance(value, str) else None
        except ValueError:
            ip = None
        if not hostname or ip is None:
            warnings.append(f"ignoring {hostname!r}: {value!r} is not an IP address")
        elif ip not in subnet:
            warnings.append(f"ignoring {hostname}: {ip} is outside net.subnet {subnet}")
        elif not is_usable(ip, subnet):
            warnings.append(
                f"ignoring {hostname}: {ip} is reserved in {subnet} (network, "
                f"gateway or broadcast address)"
            )
        elif ip in owners:
            warnings.append(
                f"ignoring {hostname}: {ip} is already {owners[ip]}'s address"
            )
        else:
            ips[hostname] = ip
            owners[ip] = hostname
    return ips, warnings


def decode_network_ports(
    data: bytes,
) -> tuple[dict[EndpointKey, int], dict[str, int], list[str]]:
    """
    Read C{network_ports.json}: C{"hostname:port"} keys, and the original's
    plain C{"hostname"} keys, returned separately. Entries with a bad key or
    port are left out; the returned warnings say which.

    @raise CorruptStateFile: if C{data} is not one JSON object.
    """
    ports: dict[EndpointKey, int] = {}
    legacy: dict[str, int] = {}
    warnings: list[str] = []
    for key, value in sorted(_decode_object(data).items()):
        if not _is_port(value):
            warnings.append(f"ignoring {key!r}: {value!r} is not a port number")
            continue
        hostname, colon, port = key.rpartition(":")
        if not colon:
            if key:
                legacy[key] = value
            else:
                warnings.append("ignoring an entry with an empty hostname")
        elif hostname and port.isdigit() and _is_port(int(port)):
            ports[(hostname, int(port))] = value
        else:
            warnings.append(f"ignoring {key!r}: not hostname:port")
    return ports, legacy, warnings


def _is_port(value: object) -> bool:
    return type(value) is int and 1 <= value <= MAX_PORT


def load(
    state_dir: str, subnet: IPNetwork, now: Callable[[], float] = time.time
) -> Allocations:
    """
    The allocations saved in C{state_dir}, for addresses in C{subnet}.

    Missing files mean nothing was allocated yet. A file that cannot be read
    or is not a JSON object is renamed to C{<name>.corrupt-<UTC time>} (so
    nothing is lost and the next L{save} can write a good one), and counts as
    empty. Entries that cannot be used are dropped. Each of these is logged
    as a warning naming the file.
    """
    ip_path = os.path.join(state_dir, IP_MAPPINGS)
    ports_path = os.path.join(state_dir, NETWORK_PORTS)
    ips: dict[str, IPAddress] = {}
    ports: dict[EndpointKey, int] = {}
    legacy: dict[str, int] = {}
    data = _read_state_file(ip_path, now)
    if data is not None:
        try:
            ips, warnings = decode_ips(data, subnet)
        except CorruptStateFile as e:
            _move_aside(ip_path, str(e), now)
        else:
            _warn_all(ip_path, warnings)
    data = _read_state_file(ports_path, now)
    if data is not None:
        try:
            ports, legacy, warnings = decode_network_ports(data)
        except CorruptStateFile as e:
            _move_aside(ports_path, str(e), now)
        else:
            _warn_all(ports_path, warnings)
    return Allocations(ips, ports, legacy)


def save(state_dir: str, allocations: Allocations) -> None:
    """
    Write C{allocations} to C{state_dir} (created, 0755, if missing), each
    file atomically and durably: after a crash at any moment each file holds
    its old or its new content. This blocks on C{fsync}.

    @raise ngrokd.atomic.AtomicWriteError: naming the file that could not be
        written.
    """
    try:
        os.makedirs(state_dir, STATE_DIR_MODE, exist_ok=True)
    except OSError as e:
        raise AtomicWriteError(
            os.path.join(state_dir, IP_MAPPINGS), "create its directory", e
        ) from e
    write_atomic(
        os.path.join(state_dir, IP_MAPPINGS),
        encode_ips(allocations.ips),
        STATE_FILE_MODE,
    )
    write_atomic(
        os.path.join(state_dir, NETWORK_PORTS),
        encode_network_ports(
            allocations.network_ports, allocations.legacy_network_ports
        ),
        STATE_FILE_MODE,
    )


def _read_state_file(path: str, now: Callable[[], float]) -> bytes | None:
    try:
        return read_if_exists(path)
    except OSError as e:
        _move_aside(path, f"cannot be read: {e.strerror}", now)
        return None


def _warn_all(path: str, warnings: list[str]) -> None:
    for warning in warnings:
        _log.warn("{path}: {problem}", path=path, problem=warning)


def _move_aside(path: str, reason: str, now: Callable[[], float]) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now()))
    aside = f"{path}.corrupt-{stamp}"
    for n in range(1, 100):
        if not os.path.lexists(aside):
            break
        aside = f"{path}.corrupt-{stamp}-{n}"
    try:
        os.rename(path, aside)
    except OSError as e:
        _log.warn(
            "{path} {reason}; starting without its allocations, and it could "
            "not be moved aside: {error}",
            path=path,
            reason=reason,
            error=e.strerror,
        )
    else:
        _log.warn(
            "{path} {reason}; moved it to {aside} and starting without its allocations",
            path=path,
            reason=reason,
            aside=aside,
        )
