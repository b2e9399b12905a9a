# -*- test-case-name: ngrokd.test.test_ula -*-
"""
The IPv6 block of virtual mode when C{net.subnet6} is left to C{auto}: a
unique local /64 (RFC 4193, section 3.2), C{fd} and a random 40-bit global
ID, then subnet ID 0.

The global ID is drawn once and kept in the state directory
(C{ipv6_global_id.json}), so every address built on it stays put across
restarts, as the IPv4 ones do; two machines, or two instances with their own
state directories, draw different ones, so their blocks do not collide when
their names meet (a VPN, a container network). L{derive} is pure; L{load}
reads the file at start and L{save} writes it atomically, from a thread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from ipaddress import IPv6Network

from twisted.logger import Logger

from ngrokd.atomic import read_if_exists, write_atomic

#: The file in the state directory.
GLOBAL_ID_FILE = "ipv6_global_id.json"
#: RFC 4193: C{fc00::/7} with the L bit set.
_PREFIX = 0xFD
_BITS = 40
#: Not secret: every address built on it is in the hosts file.
_MODE = 0o644

_log = Logger()


def new_global_id(random: Callable[[int], bytes] = os.urandom) -> int:
    """
    A random 40-bit global ID (RFC 4193 asks for a random one; its SHA-1
    recipe is one way to get one).
    """
    return int.from_bytes(random(_BITS // 8), "big")


def derive(global_id: int) -> IPv6Network:
    """
    The /64 of C{global_id}: C{fdXX:XXXX:XXXX::/64}.
    """
    if not 0 <= global_id < 1 << _BITS:
        raise ValueError(f"a global ID has {_BITS} bits, got {global_id:#x}")
    prefix = (_PREFIX << _BITS | global_id) << 80
    return IPv6Network((prefix, 64))


def encode(global_id: int) -> bytes:
    """
    C{{"global_id": "0123456789", "subnet": "fd01:2345:6789::/64"}}: the
    subnet for people who read the file; only the global ID is read back.
    """
    return json.dumps(
        {"global_id": f"{global_id:010x}", "subnet": str(derive(global_id))},
        indent=2,
        sort_keys=True,
    ).encode("utf-8")


def decode(data: bytes) -> int:
    """
    @raise ValueError: C{data} is not what L{encode} writes.
    """
    document = json.loads(data.decode("utf-8"))
    text = document.get("global_id") if isinstance(document, dict) else None
    if not (
        isinstance(text, str)
        and len(text) == _BITS // 4
        and all(c in "0123456789abcdef" for c in text)
    ):
        raise ValueError("no global_id of 10 lowercase hexadecimal digits")
    return int(text, 16)


def load(state_dir: str) -> int | None:
    """
    The global ID kept in C{state_dir}; C{None} when there is none, or when
    the file cannot be used (said in the log; a new ID replaces it, and with
    it every IPv6 address).
    """
    path = os.path.join(state_dir, GLOBAL_ID_FILE)
    try:
        data = read_if_exists(path)
    except OSError as e:
        _log.warn(
            "cannot read {path}: {error}; IPv6 addresses get a new block",
            path=path,
            error=e.strerror,
        )
        return None
    if data is None:
        return None
    try:
        return decode(data[:4096])
    except (UnicodeDecodeError, ValueError) as e:
        _log.warn(
            "{path} is not a global ID ngrokd wrote ({error}); IPv6 addresses"
            " get a new block",
            path=path,
            error=e,
        )
        return None


def save(state_dir: str, global_id: int) -> None:
    """
    Keep C{global_id} in C{state_dir}. This blocks on C{fsync}.

    @raise ngrokd.atomic.AtomicWriteError: naming the file.
    """
    write_atomic(os.path.join(state_dir, GLOBAL_ID_FILE), encode(global_id), _MODE)
