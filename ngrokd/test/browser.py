"""
Headless Chromium for the tests, driven over the DevTools protocol on a
pipe (no extra package): open a page (or a document of the test's own, as
if a web site served it), read its DOM as it changes, take a screenshot.
Every run has a fresh profile and a bounded end.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

#: Where Debian's package puts it, then the usual other names.
NAMES = ("chromium", "chromium-browser", "google-chrome")

#: What a headless Chromium needs here: no sandbox as root, and no traffic
#: of its own (the machine's network is closed).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """
    The path of a Chromium binary, or C{None}.
    """
    for name in NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    return None


class DevToolsError(Exception):
    """
    Chromium answered a DevTools command with an error, or went away.
    """


class _Pipe(ProcessProtocol):
    """
    The DevTools protocol over C{--remote-debugging-pipe}: JSON messages
    ended by a NUL byte, written to the child's fd 3, read from its fd 4.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._next_id = 1
        self._pending: dict[int, Deferred[dict[str, Any]]] = {}
        #: What to do with each kind of event: called with its parameters
        #: and session.
        self.on_event: dict[str, Callable[[dict[str, Any], str], object]] = {}
        self.errors = b""
        self.ended: Deferred[None] = Deferred()

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str = ""
    ) -> Deferred[dict[str, Any]]:
        message: dict[str, Any] = {"id": self._next_id, "method": method}
        message["params"] = params or {}
        if session:
            message["sessionId"] = session
        answer: Deferred[dict[str, Any]] = Deferred()
        self._pending[self._next_id] = answer
        self._next_id += 1
        assert self.transport is not None
        self.transport.writeToChild(3, json.dumps(message).encode() + b"\0")
        return answer

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            self.errors = (self.errors + data)[-MAX_MESSAGE:]
            return
        if childFD != 4:
            return
        self._buffer += data
        if len(self._buffer) > MAX_MESSAGE:
            raise DevToolsError("a DevTools message larger than the limit")
        while b"\0" in self._buffer:
            message, _, self._buffer = self._buffer.partition(b"\0")
            reply = json.loads(message)
            handler = self.on_event.get(reply.get("method", ""))
            if handler is not None:
                handler(reply.get("params", {}), reply.get("sessionId", ""))
                continue
            answer = self._pending.pop(reply.get("id", 0), None)
            if answer is None:
                continue
            if "error" in reply:
                answer.errback(DevToolsError(reply["error"]))
            else:
                answer.callback(reply.get("result", {}))

    def processEnded(self, reason: Failure) -> None:
        pending, self._pending = self._pending, {}
        for answer in pending.values():
            answer.errback(DevToolsError("chromium exited"))
        self.ended.callback(None)


#: The largest DevTools message read (a screenshot is the largest).
MAX_MESSAGE = 64 << 20


class Browser:
    """
    A headless Chromium driven over the DevTools protocol. Use
    L{start_browser}; C{close} stops it (SIGKILL after a bound).
    """

    def __init__(self, pipe: _Pipe, process: Any) -> None:
        self._pipe = pipe
        self._process = process

    async def open(
        self, url: str, width: int = 1200, height: int = 900, document: bytes = b""
    ) -> str:
        """
        A new tab of C{width} x C{height} CSS pixels at C{url}; its session.
        With C{document}, the tab gets that HTML for C{url} itself, as if
        the site at C{url} had served it; what it loads next comes from the
        network.
        """
        target = await self._pipe.call("Target.createTarget", {"url": "about:blank"})
        attached = await self._pipe.call(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
        )
        session: str = attached["sessionId"]
        await self._pipe.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        if document:
            self._serve(session, url, document)
            patterns = [{"urlPattern": url, "requestStage": "Request"}]
            await self._pipe.call("Fetch.enable", {"patterns": patterns}, session)
        await self._pipe.call("Page.navigate", {"url": url}, session)
        return session

    def _serve(self, session: str, url: str, document: bytes) -> None:
        def paused(params: dict[str, Any], paused_in: str) -> None:
            if paused_in != session:
                return
            answer = {"requestId": params["requestId"]}
            if params["request"]["url"] != url:
                self._pipe.call("Fetch.continueRequest", answer, session)
                return
            answer |= {
                "responseCode": 200,
                "responseHeaders": [
                    {"name": "Content-Type", "value": "text/html; charset=utf-8"}
                ],
                "body": base64.b64encode(document).decode("ascii"),
            }
            self._pipe.call("Fetch.fulfillRequest", answer, session)

        self._pipe.on_event["Fetch.requestPaused"] = paused

    async def evaluate(self, session: str, expression: str) -> Any:
        """
        The value of a JavaScript expression in the tab.
        """
        result = await self._pipe.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True},
            session,
        )
        if "exceptionDetails" in result:
            raise DevToolsError(result["exceptionDetails"])
        return result["result"].get("value")

    async def wait_for(
        self, session: str, expression: str, what: str, timeout: float = 20.0
    ) -> Any:
        """
        Wait, at most C{timeout} seconds, until C{expression} is true in the
        tab; its last value.
        """
        for _ in range(int(timeout / 0.1)):
            value = await self.evaluate(session, expression)
            if value:
                return value
            await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"timed out waiting in the browser for {what}")

    async def screenshot(self, session: str) -> bytes:
        """
        The whole page as PNG.
        """
        shot = await self._pipe.call(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
            session,
        )
        return base64.b64decode(shot["data"])

    async def close(self, timeout: float = 10.0) -> None:
        """
        Ask Chromium to quit, kill it if it does not.
        """
        killer = reactor.callLater(timeout, self._process.signalProcess, signal.SIGKILL)
        try:
            self._pipe.call("Browser.close").addErrback(lambda _: None)
            await self._pipe.ended
        finally:
            if killer.active():
                killer.cancel()


def start_browser(binary: str, profile: str, flags: Sequence[str] = ()) -> Browser:
    """
    Chromium with a fresh profile in C{profile} and C{flags} besides
    L{FLAGS}, driven over a pipe.
    """
    os.makedirs(profile, exist_ok=True)
    pipe = _Pipe()
    process = reactor.spawnProcess(
        pipe,
        binary,
        [
            binary,
            *FLAGS,
            *flags,
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ],
        env={**os.environ, "HOME": profile},
        childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"},
    )
    return Browser(pipe, process)
