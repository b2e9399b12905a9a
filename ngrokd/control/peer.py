# -*- test-case-name: ngrokd.test.test_control -*-
"""
Who is on the other end of the control socket, and what they may do.

Read commands are open to whoever can open the socket (its mode is 0660:
its owner and group). Commands that change the daemon need root, the
daemon's own user, or a member of C{server.admin_group}; the kernel says
who the peer is (C{SO_PEERCRED} on Linux, C{LOCAL_PEERCRED} on macOS), so
nothing the client sends can claim it.
"""

from __future__ import annotations

import socket
import struct
import sys

from attrs import frozen

#: macOS: getsockopt level and option for the peer's credentials.
_SOL_LOCAL = 0
_LOCAL_PEERCRED = 1
#: macOS: struct xucred {u_int version; uid_t uid; short ngroups; gid_t groups[16]}.
_XUCRED = struct.Struct("=IIh16I")


@frozen
class Peer:
    """
    The process at the other end: its uid and every group it is in.
    """

    pid: int
    uid: int
    gids: frozenset[int]


def peer_of(sock: socket.socket) -> Peer:
    """
    The credentials the kernel holds for C{sock}'s peer.

    @raise OSError: the platform cannot tell.
    """
    if sys.platform.startswith("linux"):
        pid, uid, gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
        return Peer(pid, uid, frozenset({gid, *_linux_groups(pid)}))
    if sys.platform == "darwin":
        raw = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED.size)
        _, uid, count, *groups = _XUCRED.unpack(raw[: _XUCRED.size])
        return Peer(0, uid, frozenset(groups[:count]))
    raise OSError(f"cannot tell a socket peer's credentials on {sys.platform}")


def _linux_groups(pid: int) -> list[int]:
    """
    The supplementary groups of process C{pid} (procfs, no name service).
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def may_change(peer: Peer, daemon_uid: int, admin_gid: int | None) -> bool:
    """
    Whether C{peer} may run commands that change the daemon.
    """
    if peer.uid in (0, daemon_uid):
        return True
    return admin_gid is not None and admin_gid in peer.gids


def refusal(command: str, admin_group: str, config_path: str) -> str:
    """
    Why a change was refused, and what to do about it.
    """
    if admin_group:
        who = f"root or a member of the group {admin_group!r}"
    else:
        who = f"root (or set server.admin_group in {config_path} to a group)"
    return f"{command} changes the daemon: run it as {who}, e.g. sudo ngrokctl"
