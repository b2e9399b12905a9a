"""
Tests for L{ngrokd.ngrok.lastgood}: the endpoints of the last good poll, in
a real state directory.
"""

from __future__ import annotations

import os
import stat
import threading

from twisted.trial.unittest import SynchronousTestCase

from ngrokd.ngrok.api import ApiEndpoint
from ngrokd.ngrok.lastgood import LAST_GOOD, MAX_SIZE, load, save
from ngrokd.test.test_discovery import capture_logs

ENDPOINTS = [
    ApiEndpoint("ep_1", "tcp://db.prod:5432", "tcp"),
    ApiEndpoint("ep_2", "http://web.prod", ""),
]


class LastGoodTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = self.mktemp()
        os.mkdir(self.state)
        self.path = os.path.join(self.state, LAST_GOOD)
        self.events = capture_logs(self)

    def put(self, data: bytes) -> None:
        with open(self.path, "wb") as f:
            f.write(data)

    def warnings(self) -> list[str]:
        return [str(e.get("path")) for e in self.events]

    def test_roundTrip(self) -> None:
        """
        What is saved loads back, with the operator it belongs to; the
        file is 0644 and replaced whole.
        """
        self.assertIsNone(load(self.state))
        save(self.state, "k8sop_1", ENDPOINTS)
        save(self.state, "k8sop_2", ENDPOINTS[:1])
        self.assertEqual(load(self.state), ("k8sop_2", ENDPOINTS[:1]))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o644)
        self.assertEqual(os.listdir(self.state), [LAST_GOOD])

    def test_unusableIgnored(self) -> None:
        """
        A file that is not what ngrokd writes, or too large, is ignored with
        a warning naming it.
        """
        for data in [
            b"{",
            b"[]",
            b'{"operator_id": "k", "endpoints": [{"id": 1}]}',
            b'{"operator_id": "k", "endpoints": [1]}',
            b"\xff",
            b" " * (MAX_SIZE + 1),
        ]:
            self.put(data)
            self.assertIsNone(load(self.state), data[:40])
        self.assertEqual(self.warnings(), [self.path] * 6)

    def test_fifoIgnored(self) -> None:
        """
        A FIFO in the file's place is ignored with a warning saying what it
        is, without waiting for a writer (which would hold the daemon's
        file thread, and so its stop, for ever).
        """
        os.mkfifo(self.path)
        loaded: list[object] = []
        # In a thread of its own, so that a load that waits fails the test
        # instead of hanging it.
        reading = threading.Thread(
            target=lambda: loaded.append(load(self.state)), daemon=True
        )
        reading.start()
        reading.join(10)
        self.assertEqual(loaded, [None], "load() waited for a writer")
        (event,) = self.events
        self.assertEqual(event["path"], self.path)
        self.assertIn("a FIFO", event["error"])
