"""
Tests for L{ngrokd.host.ula}.
"""

from __future__ import annotations

import os
from ipaddress import IPv6Network

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.host.ula import (
    GLOBAL_ID_FILE,
    decode,
    derive,
    encode,
    load,
    new_global_id,
    save,
)


class DeriveTests(SynchronousTestCase):
    """
    The /64 of RFC 4193: fd, 40 bits of global ID, subnet ID 0.
    """

    def test_layout(self) -> None:
        """
        The global ID follows fd, and the subnet ID is 0.
        """
        self.assertEqual(derive(0x0123456789), IPv6Network("fd01:2345:6789::/64"))
        self.assertEqual(derive(0xFFFFFFFFFF), IPv6Network("fdff:ffff:ffff::/64"))
        self.assertEqual(derive(0), IPv6Network("fd00::/64"))

    def test_unique_local(self) -> None:
        """
        Every derived block is unique local (fc00::/7) and private.
        """
        for gid in (0, 1, 0x8000000000, 0xFFFFFFFFFF):
            block = derive(gid)
            self.assertTrue(block.subnet_of(IPv6Network("fc00::/7")))
            self.assertTrue(block.is_private)

    def test_tooLarge(self) -> None:
        """
        A global ID wider than 40 bits is refused.
        """
        self.assertRaises(ValueError, derive, 1 << 40)

    def test_random(self) -> None:
        """
        A new global ID is 40 bits of the random source.
        """
        self.assertEqual(
            new_global_id(lambda n: b"\x01\x02\x03\x04\x05"[:n]), 0x0102030405
        )


class FileTests(SynchronousTestCase):
    """
    The global ID is kept in the state directory.
    """

    def setUp(self) -> None:
        self.state_dir = self.mktemp()
        os.mkdir(self.state_dir)
        self.path = os.path.join(self.state_dir, GLOBAL_ID_FILE)

    def test_roundTrip(self) -> None:
        """
        What is saved is loaded back; the file says the subnet too, and is
        0644.
        """
        self.assertIsNone(load(self.state_dir))
        save(self.state_dir, 0xABCDEF0123)
        self.assertEqual(load(self.state_dir), 0xABCDEF0123)
        with open(self.path, "rb") as f:
            self.assertEqual(
                f.read(),
                b'{\n  "global_id": "abcdef0123",\n  "subnet": "fdab:cdef:123::/64"\n}',
            )
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o644)

    def test_damaged(self) -> None:
        """
        A file that is not what ngrokd writes is ignored with a warning
        naming it.
        """
        for content in (
            b"{",
            b"[]",
            b'{"global_id": "12"}',
            b'{"global_id": "ABCDEF0123"}',
        ):
            with open(self.path, "wb") as f:
                f.write(content)
            with capturedLogs() as events:
                self.assertIsNone(load(self.state_dir))
            self.assertEqual(len(events), 1)
            self.assertIn(self.path, events[0]["path"])

    def test_decode(self) -> None:
        """
        L{decode} reads what L{encode} writes.
        """
        self.assertEqual(decode(encode(7)), 7)
