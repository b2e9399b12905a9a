# -*- test-case-name: ngrokd.test.test_portowner -*-
"""
Which process holds a TCP port, for the message of a listen that failed
because the port is taken.

"10.107.0.3:5432 is already in use by pid 812 (postgres)" can be acted on;
"address already in use" sends the user hunting. Linux tells through
C{/proc}: C{/proc/net/tcp} and C{tcp6} list the sockets of the caller's
network namespace with their inode, and the C{/proc/PID/fd} links of a
process name the socket inodes it holds. This is best effort: only root sees
every process's descriptors, and other systems have no C{/proc}; then no
holder is named. It reads many small files, so call it from a thread.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address

IPAddress = IPv4Address | IPv6Address

#: Socket states (C{include/net/tcp_states.h}) that keep a port bound:
#: listening, and bound but not yet listening.
_LISTEN, _CLOSE = "0A", "07"


def port_owners(address: str, port: int, proc: str = "/proc") -> list[str]:
    """
    The processes holding a TCP socket bound to C{port} that keeps
    C{address} from binding it: on the same address, or on a wildcard
    address (or any address when C{address} is a wildcard). Each is named
    C{pid N (command)}, sorted by pid.

    @return: an empty list when no holder can be seen.
    """
    wanted = _unmapped(ip_address(address))
    inodes = set(_bound_inodes(proc, wanted, port))
    if not inodes:
        return []
    owners: dict[int, str] = {}
    for pid in _pids(proc):
        fd_dir = os.path.join(proc, str(pid), "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or another user's process and we are not root
        for fd in fds:
            try:
                link = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in inodes:
                owners[pid] = f"pid {pid} ({_command(proc, pid)})"
                break
    return [owners[pid] for pid in sorted(owners)]


def parse_address(text: str) -> tuple[IPAddress, int]:
    """
    An address and port of C{/proc/net/tcp} or C{tcp6} (C{0100007F:1F90}):
    the address is printed as 32-bit words in the host's byte order, the
    port as a number, both in hex.
    """
    hex_address, _, hex_port = text.partition(":")
    raw = b"".join(
        int(hex_address[i : i + 8], 16).to_bytes(4, sys.byteorder)
        for i in range(0, len(hex_address), 8)
    )
    address: IPAddress = IPv4Address(raw) if len(raw) == 4 else IPv6Address(raw)
    return address, int(hex_port, 16)


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _conflicts(held: IPAddress, wanted: IPAddress) -> bool:
    """
    Whether a socket bound to C{held} keeps C{wanted} from binding the same
    port. An IPv6 wildcard takes IPv4 too (unless it is C{IPV6_V6ONLY},
    which C{/proc} does not show).
    """
    for wildcard, other in ((held, wanted), (wanted, held)):
        if wildcard.is_unspecified and (wildcard.version == 6 or other.version == 4):
            return True
    return held == wanted


def _bound_inodes(proc: str, wanted: IPAddress, port: int) -> Iterator[int]:
    for table in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc, "net", table)) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] not in (_LISTEN, _CLOSE):
                continue
            try:
                held, held_port = parse_address(fields[1])
                inode = int(fields[9])
            except ValueError:
                continue
            if held_port == port and inode and _conflicts(_unmapped(held), wanted):
                yield inode


def _pids(proc: str) -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir(proc) if name.isdigit())
    except OSError:
        return []


def _command(proc: str, pid: int) -> str:
    try:
        with open(os.path.join(proc, str(pid), "comm")) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"
