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

An address or port that an endpoint gives up is held back from other
endpoints for a while (C{net.reuse_after}), unless nothing else is left: a
client still using it must not silently reach another service. The same
endpoint coming back within that time gets it again.

With C{net.subnet6}, every such hostname also gets an IPv6 address, kept
the same way. The original knew only IPv4, so those go to a file of their
own, C{ip6_mappings.json}, in the format of C{ip_mappings.json}: the
original's file stays as it reads it.

L{allocate} is a pure function of the previous allocations, of what is
wanted now, and of the time. L{load} and L{save} keep the result in the
state directory, in the original's files and formats (and read its older
port format), so an upgrade keeps every address, and what is held back in
C{released.json}. A damaged state file never stops the daemon: it
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

#: File names in the state directory (the Go ngrokd's, and ngrokd's own).
IP_MAPPINGS = "ip_mappings.json"
IP6_MAPPINGS = "ip6_mappings.json"
NETWORK_PORTS = "network_ports.json"
RELEASED = "released.json"
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
    #: Addresses given up, held back from other hostnames: by the hostname
    #: that had it, the address and when (POSIX time) it was given up.
    released_ips: Mapping[str, tuple[IPAddress, float]] = field(
        factory=dict, converter=_frozen
    )
    #: Network ports given up, likewise, by endpoint.
    released_ports: Mapping[EndpointKey, tuple[int, float]] = field(
        factory=dict, converter=_frozen
    )
    #: The IPv6 address of each hostname (from C{net.subnet6}), and those
    #: given up, as C{ips} and C{released_ips}.
    ips6: Mapping[str, IPAddress] = field(factory=dict, converter=_frozen)
    released_ips6: Mapping[str, tuple[IPAddress, float]] = field(
        factory=dict, converter=_frozen
    )


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


def _count(usable: range) -> int:
    # len() of a range fails beyond sys.maxsize (an IPv6 /64 is).
    return usable.stop - usable.start


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
    now: float = 0.0,
    hold: float = 0.0,
    subnet6: IPNetwork | None = None,
) -> AllocationResult:
    """
    Allocate an address to every hostname of C{wanted_ips} and a network port
    to every endpoint of C{wanted_ports}, keeping what C{previous} gave them.

    A hostname keeps its previous address if that address is usable in
    C{subnet}; an endpoint keeps its previous port if it lies between
    C{start_port} and 65535 (so changing either setting moves what no longer
    fits it). What is no longer wanted is released, and held back for
    C{hold} seconds from C{now}: a hostname or endpoint that comes back
    within that time gets its value again, and newcomers get the lowest
    value from C{.2} of C{subnet} (from C{start_port}) that is neither in
    use nor held; only when none is left do they get a held one. Should
    C{previous} give one address (or port) to several, the first in sorted
    order keeps it. So no two hostnames ever share an address, no two
    endpoints a port, and the result depends only on the sets wanted (and
    the time), not on their order.

    When the subnet or the port range is full, the hostnames or endpoints
    left over are reported in L{AllocationResult.errors}; all others are
    still allocated.

    With C{subnet6}, every hostname of C{wanted_ips} also gets an IPv6
    address of it, by the same rules; one left without is not an error (it
    is served over IPv4), and without C{subnet6} none has one.
    """
    errors: dict[str | EndpointKey, str] = {}
    wanted = set(wanted_ips)
    ips, released_ips = _addresses(
        previous.ips, previous.released_ips, wanted, subnet, (now, hold), errors
    )
    ips6: dict[str, IPAddress] = {}
    released_ips6: dict[str, tuple[IPAddress, float]] = {}
    if subnet6 is not None:
        ips6, released_ips6 = _addresses(
            previous.ips6, previous.released_ips6, wanted, subnet6, (now, hold), {}
        )
    ports, released_ports = _allocate(
        previous.network_ports,
        previous.legacy_network_ports,
        previous.released_ports,
        set(wanted_ports),
        range(start_port, MAX_PORT + 1),
        (now, hold),
        errors,
        lambda key: (
            f"no network port left for {key[0]}:{key[1]}: all ports from "
            f"{start_port} to {MAX_PORT} are in use"
        ),
    )
    return AllocationResult(
        Allocations(
            ips,
            ports,
            released_ips=released_ips,
            released_ports=released_ports,
            ips6=ips6,
            released_ips6=released_ips6,
        ),
        errors,
    )


def _addresses(
    previous: Mapping[str, IPAddress],
    released: Mapping[str, tuple[IPAddress, float]],
    wanted: set[str],
    subnet: IPNetwork,
    clock: tuple[float, float],
    errors: dict[str | EndpointKey, str],
) -> tuple[dict[str, IPAddress], dict[str, tuple[IPAddress, float]]]:
    """
    The addresses of L{allocate} in C{subnet}, and those held back.
    """
    make = IPv4Address if subnet.version == 4 else IPv6Address
    usable = usable_addresses(subnet)
    values, held = _allocate(
        {host: int(ip) for host, ip in previous.items() if is_usable(ip, subnet)},
        {},
        {
            host: (int(ip), when)
            for host, (ip, when) in released.items()
            if is_usable(ip, subnet)
        },
        wanted,
        usable,
        clock,
        errors,
        lambda host: (
            f"no address left for {host}: all {_count(usable)}"
            f" usable addresses of {subnet} are in use"
        ),
    )
    return (
        {host: make(value) for host, value in values.items()},
        {host: (make(value), when) for host, (value, when) in held.items()},
    )


#: What gets a value: a hostname (an address) or an endpoint (a port).
K = TypeVar("K", str, tuple[str, int])


def _allocate(
    previous: Mapping[K, int],
    legacy: Mapping[str, int],
    released: Mapping[K, tuple[int, float]],
    wanted: set[K],
    usable: range,
    clock: tuple[float, float],
    errors: dict[str | EndpointKey, str],
    no_value: Callable[[K], str],
) -> tuple[dict[K, int], dict[K, tuple[int, float]]]:
    """
    The values of L{allocate}, for addresses or ports (as integers), and
    what is held back after it; why those left without a value have none
    goes to C{errors}.

    @param legacy: the original's ports by hostname alone, each given to its
        hostname's lowest wanted endpoint port.
    @param clock: the time now, and how long a released value is held.
    """
    now, hold = clock
    values: dict[K, int] = {}
    used: set[int] = set()

    def keep(key: K, value: int) -> None:
        if value in usable and value not in used:
            values[key] = value
            used.add(value)

    for key in sorted(wanted & previous.keys()):
        keep(key, previous[key])
    if legacy:
        lowest: dict[str, K] = {}
        for key in sorted(wanted):
            lowest.setdefault(key[0], key)
        for hostname in sorted(legacy.keys() & lowest.keys()):
            if lowest[hostname] not in values:
                keep(lowest[hostname], legacy[hostname])
    held = {
        key: (value, when)
        for key, (value, when) in released.items()
        if now - when < hold and key not in values
    }
    for key in sorted(wanted & held.keys()):
        if key not in values:
            keep(key, held[key][0])
    if hold > 0:
        for key in previous.keys() - wanted:
            held.setdefault(key, (previous[key], now))
    held = {key: entry for key, entry in held.items() if key not in values}
    newcomers = wanted - values.keys()
    handed = _hand_out(newcomers, usable, used | {v for v, _ in held.values()})
    used.update(handed.values())
    handed.update(_hand_out(newcomers - handed.keys(), usable, used))
    values.update(handed)
    for key in sorted(wanted - values.keys()):
        errors[key] = no_value(key)
    taken = set(values.values())
    return values, {k: entry for k, entry in held.items() if entry[0] not in taken}


def _hand_out(newcomers: set[K], usable: range, used: set[int]) -> dict[K, int]:
    """
    Give each of C{newcomers}, in sorted order, the lowest value of
    C{usable} not in C{used}; those left when C{usable} runs out get none.
    """
    handed: dict[K, int] = {}
    taken = set(used)
    candidate = usable.start
    for key in sorted(newcomers):
        while candidate in taken:
            candidate += 1
        if candidate not in usable:
            break
        handed[key] = candidate
        taken.add(candidate)
    return handed


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
    data: bytes, subnet: IPNetwork, key: str = "net.subnet"
) -> tuple[dict[str, IPAddress], list[str]]:
    """
    Read C{ip_mappings.json} (or C{ip6_mappings.json}, whose C{subnet} is
    the setting C{key}). Entries that are not a usable address of
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
            warnings.append(f"ignoring {hostname}: {ip} is outside {key} {subnet}")
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


def encode_released(allocations: Allocations) -> bytes:
    """
    C{released.json}: what is held back, and since when (POSIX time):
    C{{"ips": {hostname: [address, time]}, "network_ports": {"hostname:port":
    [port, time]}, "ips6": {hostname: [address, time]}}}.
    """
    return _encode(
        {
            "ips": {
                host: [str(ip), when]
                for host, (ip, when) in allocations.released_ips.items()
            },
            "ips6": {
                host: [str(ip), when]
                for host, (ip, when) in allocations.released_ips6.items()
            },
            "network_ports": {
                f"{h}:{p}": [port, when]
                for (h, p), (port, when) in allocations.released_ports.items()
            },
        }
    )


#: Addresses held back, by hostname.
_ReleasedIPs = dict[str, tuple[IPAddress, float]]


def decode_released(
    data: bytes, subnet: IPNetwork, subnet6: IPNetwork | None = None
) -> tuple[_ReleasedIPs, dict[EndpointKey, tuple[int, float]], _ReleasedIPs]:
    """
    Read C{released.json}: the addresses (in C{subnet}), the ports, and the
    IPv6 addresses (in C{subnet6}; none without it) held back. Entries that
    are not what L{encode_released} writes are left out (they are only held
    back, never in use).

    @raise CorruptStateFile: if C{data} is not one JSON object.
    """
    content = _decode_object(data)
    ports: dict[EndpointKey, tuple[int, float]] = {}
    for key, entry in _entries(content.get("network_ports")):
        hostname, _, port = key.rpartition(":")
        if hostname and port.isdigit() and _is_port(entry[0]):
            ports[(hostname, int(port))] = (entry[0], entry[1])
    ips6 = {} if subnet6 is None else _released_ips(content.get("ips6"), subnet6)
    return _released_ips(content.get("ips"), subnet), ports, ips6


def _released_ips(section: object, subnet: IPNetwork) -> _ReleasedIPs:
    ips: _ReleasedIPs = {}
    for host, entry in _entries(section):
        try:
            ip = ip_address(entry[0])
        except ValueError:
            continue
        if host and ip in subnet:
            ips[host] = (ip, entry[1])
    return ips


def _entries(section: object) -> list[tuple[str, tuple[Any, float]]]:
    """
    The C{[value, time]} entries of one section of C{released.json}.
    """
    if not isinstance(section, dict):
        return []
    return [
        (key, (entry[0], float(entry[1])))
        for key, entry in section.items()
        if isinstance(entry, list)
        and len(entry) == 2
        and type(entry[1]) in (int, float)
        and isinstance(entry[0], str | int)
    ]


def _is_port(value: object) -> bool:
    return type(value) is int and 1 <= value <= MAX_PORT


def load(
    state_dir: str,
    subnet: IPNetwork,
    now: Callable[[], float] = time.time,
    subnet6: IPNetwork | None = None,
) -> Allocations:
    """
    The allocations saved in C{state_dir}, for addresses in C{subnet} (and
    IPv6 addresses in C{subnet6}; none without it).

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
    found_ips = _decoded(ip_path, lambda data: decode_ips(data, subnet), now)
    if found_ips is not None:
        ips, warnings = found_ips
        _warn_all(ip_path, warnings)
    found_ports = _decoded(ports_path, decode_network_ports, now)
    if found_ports is not None:
        ports, legacy, warnings = found_ports
        _warn_all(ports_path, warnings)
    ips6: dict[str, IPAddress] = {}
    if subnet6 is not None:
        ip6_path = os.path.join(state_dir, IP6_MAPPINGS)
        found_ips6 = _decoded(
            ip6_path, lambda data: decode_ips(data, subnet6, "net.subnet6"), now
        )
        if found_ips6 is not None:
            ips6, warnings = found_ips6
            _warn_all(ip6_path, warnings)
    released_ips, released_ports, released_ips6 = _decoded(
        os.path.join(state_dir, RELEASED),
        lambda data: decode_released(data, subnet, subnet6),
        now,
    ) or ({}, {}, {})
    return Allocations(
        ips,
        ports,
        legacy,
        released_ips,
        released_ports,
        ips6=ips6,
        released_ips6=released_ips6,
    )


D = TypeVar("D")


def _decoded(
    path: str, decode: Callable[[bytes], D], now: Callable[[], float]
) -> D | None:
    """
    C{decode} of the file at C{path}; C{None} when there is none, or when it
    cannot be read or decoded (then it is moved aside).
    """
    data = _read_state_file(path, now)
    if data is None:
        return None
    try:
        return decode(data)
    except CorruptStateFile as e:
        _move_aside(path, str(e), now)
        return None


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
        os.path.join(state_dir, IP6_MAPPINGS),
        encode_ips(allocations.ips6),
        STATE_FILE_MODE,
    )
    write_atomic(
        os.path.join(state_dir, NETWORK_PORTS),
        encode_network_ports(
            allocations.network_ports, allocations.legacy_network_ports
        ),
        STATE_FILE_MODE,
    )
    write_atomic(
        os.path.join(state_dir, RELEASED),
        encode_released(allocations),
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
