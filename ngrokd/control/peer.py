# -*- test-case-name: ngrokd.test.test_control -*-
"""
Who is on the other end of the control socket, and what they may do.

Read commands are open to whoever can open the socket (its mode is 0660:
its owner and group). Commands that change the daemon need root, the
daemon's own user, or a member of C{server.admin_group}; the kernel says
who the peer is (C{SO_PEERCRED} and C{SO_PEERGROUPS} on Linux,
C{LOCAL_PEERCRED} on macOS), as it was when the peer connected, so nothing
the client sends, and no process that later takes its pid, can claim it.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import sys

from attrs import frozen

#: macOS: getsockopt level and option for the peer's credentials.
_SOL_LOCAL = 0
_LOCAL_PEERCRED = 1
#: macOS: struct xucred {u_int version; uid_t uid; short ngroups; gid_t groups[16]}.
_XUCRED = struct.Struct("=IIh16I")
#: Linux >= 4.13: the peer's supplementary groups when it connected, an
#: array of gid_t (Python's socket module does not name the option).
_SO_PEERGROUPS = 59
#: The most bytes Python's getsockopt returns: 256 groups.
_GETSOCKOPT_MAX = 1024
#: Linux's NGROUPS_MAX: the most groups a process can be in.
_NGROUPS_MAX = 65536


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

    @raise OSError: the platform cannot tell, or C{sock} is not a UNIX
        socket (over TCP nobody can be told).
    """
    if sock.family != socket.AF_UNIX:
        raise OSError(errno.ENOTSUP, "only a UNIX socket's peer can be told")
    if sys.platform.startswith("linux"):
        pid, uid, gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
        return Peer(pid, uid, frozenset({gid, *_linux_groups(sock, pid)}))
    if sys.platform == "darwin":
        raw = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED.size)
        _, uid, count, *groups = _XUCRED.unpack(raw[: _XUCRED.size])
        return Peer(0, uid, frozenset(groups[:count]))
    raise OSError(f"cannot tell a socket peer's credentials on {sys.platform}")


def _linux_groups(sock: socket.socket, pid: int) -> tuple[int, ...]:
    """
    The supplementary groups of C{sock}'s peer, as they were when it
    connected (C{SO_PEERGROUPS}); on kernels older than 4.13, those process
    C{pid} has now.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _GETSOCKOPT_MAX)
    except OSError as e:
        if e.errno == errno.ERANGE:  # more groups than Python's buffer holds
            return _many_peer_groups(sock)
        if e.errno != errno.ENOPROTOOPT:
            raise
        return _proc_groups(pid)
    return struct.unpack(f"={len(raw) // 4}I", raw)


def _many_peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """
    C{SO_PEERGROUPS} through libc, with room for every group a process can
    be in.
    """
    groups = (ctypes.c_uint32 * _NGROUPS_MAX)()
    size = ctypes.c_uint32(ctypes.sizeof(groups))
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.getsockopt(
        sock.fileno(), socket.SOL_SOCKET, _SO_PEERGROUPS, groups, ctypes.byref(size)
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"SO_PEERGROUPS: {errno.errorcode.get(code, code)}")
    return tuple(groups[: size.value // 4])


def _proc_groups(pid: int) -> tuple[int, ...]:
    """
    The supplementary groups of process C{pid} (procfs, no name service).
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


def privileged(peer: Peer | None, daemon_uid: int) -> bool:
    """
    Whether C{peer} is root or the daemon's own user.
    """
    return peer is not None and peer.uid in (0, daemon_uid)


def may_change(peer: Peer, daemon_uid: int, admin_gid: int | None) -> bool:
    """
    Whether C{peer} may run commands that change the daemon.
    """
    if privileged(peer, daemon_uid):
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
