"""
Tests for L{ngrokd.host.portowner}: naming the process that holds a port, from a
C{/proc} tree made for the test and from the real one.
"""

from __future__ import annotations

import os
import socket
import sys
from ipaddress import ip_address

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ngrokd.host.portowner import parse_address, port_owners

_HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when"
_HEADER += " retrnsmt   uid  timeout inode\n"


def _hex4(address: str) -> str:
    """
    An IPv4 address as /proc/net/tcp prints it on this machine.
    """
    return f"{int.from_bytes(ip_address(address).packed, sys.byteorder):08X}"


def _hex6(address: str) -> str:
    packed = ip_address(address).packed
    return "".join(
        f"{int.from_bytes(packed[i : i + 4], sys.byteorder):08X}"
        for i in range(0, 16, 4)
    )


def _line(n: int, local: str, state: str, inode: int) -> str:
    return (
        f"   {n}: {local} 00000000:0000 {state} 00000000:00000000 00:00000000"
        f" 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
    )


class ParseAddressTests(SynchronousTestCase):
    """
    L{parse_address} reads the kernel's hex notation.
    """

    def test_ipv4(self) -> None:
        """
        An IPv4 address and port.
        """
        self.assertEqual(
            parse_address(f"{_hex4('127.0.0.1')}:1F90"),
            (ip_address("127.0.0.1"), 8080),
        )

    def test_ipv6(self) -> None:
        """
        An IPv6 address and port.
        """
        self.assertEqual(
            parse_address(f"{_hex6('fd00::2')}:0050"), (ip_address("fd00::2"), 80)
        )


class PortOwnersTests(SynchronousTestCase):
    """
    L{port_owners} finds the processes whose sockets keep an address and
    port from being bound.
    """

    def setUp(self) -> None:
        self.proc = self.mktemp()
        os.makedirs(os.path.join(self.proc, "net"))
        tcp = _HEADER + "".join(
            [
                _line(0, f"{_hex4('0.0.0.0')}:1538", "0A", 111),  # *:5432
                _line(1, f"{_hex4('10.107.0.2')}:0050", "0A", 222),  # .2:80
                _line(2, f"{_hex4('10.107.0.2')}:0051", "01", 333),  # connected
                _line(3, f"{_hex4('10.107.0.3')}:0052", "07", 444),  # bound
            ]
        )
        tcp6 = _HEADER + _line(0, f"{_hex6('::')}:1B58", "0A", 555)  # [::]:7000
        self.write("net/tcp", tcp)
        self.write("net/tcp6", tcp6)
        self.process(100, "postgres", [111])
        self.process(200, "nginx", [7, 222])
        self.process(300, "curl", [333])
        self.process(400, "python3", [444])
        self.process(500, "sshd", [555])
        self.process(600, "other", [999])

    def write(self, name: str, text: str) -> None:
        with open(os.path.join(self.proc, name), "w") as f:
            f.write(text)

    def process(self, pid: int, comm: str, inodes: list[int]) -> None:
        fd = os.path.join(self.proc, str(pid), "fd")
        os.makedirs(fd)
        self.write(f"{pid}/comm", comm + "\n")
        os.symlink("/dev/null", os.path.join(fd, "0"))
        for n, inode in enumerate(inodes, start=3):
            os.symlink(f"socket:[{inode}]", os.path.join(fd, str(n)))

    def owners(self, address: str, port: int) -> list[str]:
        return port_owners(address, port, proc=self.proc)

    def test_sameAddress(self) -> None:
        """
        A socket listening on the same address and port is named.
        """
        self.assertEqual(self.owners("10.107.0.2", 80), ["pid 200 (nginx)"])

    def test_wildcardHolder(self) -> None:
        """
        A socket on the wildcard address holds the port on every address.
        """
        self.assertEqual(self.owners("10.107.0.9", 5432), ["pid 100 (postgres)"])

    def test_ipv6WildcardHoldsIPv4(self) -> None:
        """
        An IPv6 wildcard socket holds the port for IPv4 too.
        """
        self.assertEqual(self.owners("10.107.0.9", 7000), ["pid 500 (sshd)"])

    def test_wildcardWanted(self) -> None:
        """
        Binding the wildcard conflicts with any socket on the port.
        """
        self.assertEqual(self.owners("0.0.0.0", 80), ["pid 200 (nginx)"])

    def test_boundNotListening(self) -> None:
        """
        A bound socket that does not listen yet holds its port too.
        """
        self.assertEqual(self.owners("10.107.0.3", 82), ["pid 400 (python3)"])

    def test_notHeld(self) -> None:
        """
        Connected sockets, other addresses and other ports are not holders.
        """
        self.assertEqual(self.owners("10.107.0.2", 81), [])
        self.assertEqual(self.owners("10.107.0.3", 80), [])
        self.assertEqual(self.owners("10.107.0.2", 9), [])

    def test_noProc(self) -> None:
        """
        Without /proc (another system) nobody is named.
        """
        self.assertEqual(port_owners("127.0.0.1", 80, proc=self.mktemp()), [])

    def test_realSocket(self) -> None:
        """
        On Linux, a socket this process listens on is found in the real
        /proc, named with this process's id.
        """
        if not os.path.exists("/proc/net/tcp"):
            raise SkipTest("no /proc/net/tcp: not Linux")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            owners = port_owners("127.0.0.1", port)
        self.assertEqual(len(owners), 1)
        self.assertTrue(owners[0].startswith(f"pid {os.getpid()} ("), owners)
