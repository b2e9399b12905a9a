"""
Tests for L{ngrokd.demo}, the README's quick start: the devcloud and ngrokd
run under twistd as separate processes on 127.0.0.1, as a user runs them.
"""

from __future__ import annotations

import io
import os
import re
import socket
import sys

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from ngrokd.demo import Options, run
from ngrokd.test.helpers import free_ports


class DemoTests(TestCase):
    """
    C{python -m ngrokd.demo} as the quick start runs it.
    """

    timeout = 120

    def options(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--state", os.path.abspath(self.mktemp()), *argv])
        return options

    async def test_once(self) -> None:
        """
        C{--once} brings the devcloud and ngrokd up, shows a request through
        ngrokd reaching the hello backend with the endpoint's name as its
        Host, and stops both.
        """
        start = free_ports(2)
        printed = io.StringIO()
        self.patch(sys, "stdout", printed)
        code = await run(reactor, self.options("--start-port", str(start), "--once"))
        self.assertEqual(code, 0)
        self.assertIn(
            "Hello from the backend of http://hello.demo (Host: hello.demo)",
            printed.getvalue(),
        )
        shown = re.search(r"curl http://127\.0\.0\.1:(\d+)/", printed.getvalue())
        assert shown is not None
        self.assertIn(int(shown.group(1)), (start, start + 1))

    async def test_portTaken(self) -> None:
        """
        A start port that is taken is refused at once, naming it, before
        anything is started.
        """
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            port = held.getsockname()[1]
            options = self.options("--start-port", str(port), "--once")
            with self.assertRaises(SystemExit) as caught:
                await run(reactor, options)
        self.assertIn(
            f"127.0.0.1:{port} or {port + 1} is in use", str(caught.exception)
        )
        self.assertFalse(os.path.exists(options["state"]))
