# -*- test-case-name: ngrokd.test.test_allocation -*-
"""
The allocations of L{ngrokd.host.allocator} (an address per hostname, a
network port per endpoint, what is held back), kept across restarts in the
state directory.

L{load} and L{save} keep them in the original's files and formats (and read
its older port format), so an upgrade keeps every address, and what is held
back in C{released.json}. The original knew only IPv4, so IPv6 addresses go
to a file of their own, C{ip6_mappings.json}, in the format of
C{ip_mappings.json}: the original's file stays as it reads it. A damaged
state file never stops the daemon: it is moved aside and the allocations
start afresh.

The allocator's names are importable from here too, where the daemon and
the other parts of the host wing have always found them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from ipaddress import ip_address
from typing import Any, TypeVar

from twisted.logger import Logger

from ngrokd.atomic import AtomicWriteError, read_if_exists, write_atomic
from ngrokd.host.allocator import MAX_PORT, EndpointKey, is_usable
from ngrokd.host.allocator import AllocationResult as AllocationResult
from ngrokd.host.allocator import Allocations as Allocations
from ngrokd.host.allocator import IPAddress as IPAddress
from ngrokd.host.allocator import IPNetwork as IPNetwork
from ngrokd.host.allocator import allocate as allocate

#: File names in the state directory (the Go ngrokd's, and ngrokd's own).
IP_MAPPINGS = "ip_mappings.json"
IP6_MAPPINGS = "ip6_mappings.json"
NETWORK_PORTS = "network_ports.json"
RELEASED = "released.json"
#: The state files are not secret; the original wrote them 0644 too.
STATE_FILE_MODE = 0o644
STATE_DIR_MODE = 0o755

_log = Logger()


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
