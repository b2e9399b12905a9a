"""
What the data-path benchmark reads from /proc about the processes it started:
CPU time, resident memory (at one moment, at its peak over a phase, at its
peak over the process's life) and the TCP connections a process holds.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

#: The state column of /proc/net/tcp for an ESTABLISHED connection.
TCP_ESTABLISHED = "01"
#: ... and of a listening socket.
TCP_LISTEN = "0A"
_SOCKET_LINK = "socket:["


def cpu_seconds(pid: int) -> float:
    """
    User plus system CPU time of process C{pid}, all threads.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, field: str) -> int:
    """
    A size from /proc/PID/status, in KiB: C{VmRSS} is resident memory now,
    C{VmHWM} its peak over the process's life.

    @raise LookupError: the file has no such line.
    """
    prefix = f"{field}:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(prefix):
            return int(line.split()[1])
    raise LookupError(f"/proc/{pid}/status has no {field} line")


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed since the listing
        if target.startswith(_SOCKET_LINK):
            inodes.add(int(target[len(_SOCKET_LINK) : -1]))
    return inodes


def _tcp_sockets(pid: int) -> Iterator[tuple[int, int, str]]:
    """
    Process C{pid}'s TCP sockets (IPv4 and IPv6), each as its local port,
    remote port and state (a column of /proc/net/tcp): its sockets' inodes,
    from its file descriptors, matched against the TCP tables of its network
    namespace.
    """
    inodes = _socket_inodes(pid)
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
        for row in rows:
            fields = row.split()
            if int(fields[9]) in inodes:
                local, remote, state = fields[1], fields[2], fields[3]
                yield _port(local), _port(remote), state


def _port(address: str) -> int:
    return int(address.rpartition(":")[2], 16)


def established_to_port(pid: int, port: int) -> int:
    """
    How many ESTABLISHED TCP connections process C{pid} holds to remote port
    C{port}.
    """
    return sum(
        1
        for _, remote, state in _tcp_sockets(pid)
        if state == TCP_ESTABLISHED and remote == port
    )


def listening_ports(pid: int) -> set[int]:
    """
    The TCP ports process C{pid} listens on: another process that answers
    on a port is not it.
    """
    return {local for local, _, state in _tcp_sockets(pid) if state == TCP_LISTEN}


class PeakRss:
    """
    The highest C{VmRSS} of some processes while in a C{with} block, sampled
    every C{interval} seconds by a thread: C{VmHWM} is the peak of a
    process's whole life, this is the peak of one phase.
    """

    def __init__(self, pids: Mapping[str, int], interval: float = 0.1) -> None:
        self._pids = dict(pids)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        #: name -> the highest VmRSS seen, in KiB.
        self.peaks_kib: dict[str, int] = {}

    def _sample(self) -> None:
        for name, pid in self._pids.items():
            # A process that died is reported by the phase's own check.
            with contextlib.suppress(OSError):
                rss = status_kib(pid, "VmRSS")
                self.peaks_kib[name] = max(self.peaks_kib.get(name, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
