"""
Tests for L{ngrokd.datapath.descriptors}: spares really held, really given
back, and a shortage said as the kernel says it.
"""

from __future__ import annotations

import errno
import os
import resource

from twisted.trial.unittest import SynchronousTestCase

from ngrokd.datapath.descriptors import DescriptorReserve


def open_descriptors() -> int:
    return len(os.listdir("/dev/fd"))


class DescriptorReserveTests(SynchronousTestCase):
    """
    L{DescriptorReserve} holds the descriptors it is asked for.
    """

    def test_holdReleaseClose(self) -> None:
        """
        Held spares are open descriptors; a release frees one, a smaller
        hold the extra ones, and closing all of them.
        """
        before = open_descriptors()
        reserve = DescriptorReserve()
        reserve.hold(3)
        self.assertEqual(open_descriptors(), before + 3)
        reserve.release()
        self.assertEqual((reserve.held, open_descriptors()), (2, before + 2))
        reserve.hold(1)
        self.assertEqual((reserve.held, open_descriptors()), (1, before + 1))
        reserve.close()
        self.assertEqual((reserve.held, open_descriptors()), (0, before))

    def test_shortOfDescriptors(self) -> None:
        """
        Asked for more than are free, it fails as the kernel does, and
        keeps those it could make.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        reserve = DescriptorReserve()
        self.addCleanup(reserve.close)
        highest = max(int(fd) for fd in os.listdir("/dev/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 4, hard))
        try:
            with self.assertRaises(OSError) as caught:
                reserve.hold(highest + 4)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.assertEqual(caught.exception.errno, errno.EMFILE)
        self.assertGreater(reserve.held, 0)
        self.assertLess(reserve.held, highest + 4)
