# -*- test-case-name: ngrokd.test.test_diagnose -*-
"""
What C{ngrokctl diagnose} reads from this machine: names through
C{getaddrinfo}, C{resolv.conf}, C{/etc/resolver} files, whether an address
is on an interface, the daemon's files.

Each blocks (a lookup can wait on the network, a read on a slow
filesystem), so L{ngrokd.control.diagnose} runs them in threads; each reads
at most a bounded amount.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from ngrokd.host.allocation import IPAddress
from ngrokd.readfile import read_regular

#: The most of C{resolv.conf}, or of an C{/etc/resolver} file, read.
_FILE_LIMIT = 64 * 1024
#: The most of a certificate, a key or the hosts file read.
_READ_LIMIT = 1 << 20


def lookup(host: str) -> list[str]:
    """
    The addresses C{getaddrinfo} gives C{host}, IPv4 and IPv6.

    @raise OSError: it gave none.
    """
    found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def resolv_conf(path: str) -> tuple[str | None, str]:
    """
    Where C{path} links to (C{None}: it is no link) and its text (C{""}
    when it cannot be read).
    """
    try:
        target: str | None = os.readlink(path)
    except OSError:
        target = None
    try:
        data, _ = read_regular(path, _FILE_LIMIT)
    except OSError:
        return target, ""
    return target, data.decode("utf-8", "replace")


def resolver_files(directory: str, domains: Sequence[str]) -> dict[str, bytes | None]:
    """
    Each domain's file in C{directory} (C{None}: none, or unreadable).
    """
    contents: dict[str, bytes | None] = {}
    for domain in domains:
        try:
            contents[domain], _ = read_regular(
                os.path.join(directory, domain), _FILE_LIMIT
            )
        except OSError:
            contents[domain] = None
    return contents


def is_local(address: IPAddress) -> bool:
    """
    Whether C{address} is on one of this machine's interfaces (only then can
    a socket bind to it).
    """
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(_READ_LIMIT)


def read_text(path: str) -> str:
    return read(path).decode("utf-8", "replace")
