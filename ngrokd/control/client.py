# -*- test-case-name: ngrokd.test.test_ctl -*-
"""
The client side of the control socket, as C{ngrokctl} uses it.

Every way of not getting an answer is one L{ControlError} with a sentence
for the user and the exit code C{ngrokctl} gives it: the daemon is not
running, the socket refuses this user, the daemon is too slow or serves
too many connections already, or the two sides do not speak the same
protocol version.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import UNIXClientEndpoint, clientFromString
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.protocols import amp

from ngrokd.control.commands import (
    PROTOCOL_VERSION,
    CommandFailed,
    Events,
    Hello,
    KeyRejected,
    ListEndpoints,
    NotPermitted,
    Reload,
    SetAPIKey,
    Status,
    TooManyConnections,
)

#: Exit codes of C{ngrokctl}, one per way of failing.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_PERMISSION = 4
EXIT_TIMEOUT = 5
EXIT_VERSION = 6
EXIT_RESTART = 7

#: How long one answer may take, in seconds (events waits add theirs).
TIMEOUT = 10.0


class ControlError(Exception):
    """
    No usable answer: C{str(error)} says why, C{code} is the exit code.
    """

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


#: The longest UNIX socket path the kernel takes, in bytes (C{sun_path}
#: holds 108 on Linux, 104 on macOS, with its final NUL).
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107


def client_endpoint(
    reactor: IReactorCore, socket: str, timeout: float = TIMEOUT
) -> IStreamClientEndpoint:
    """
    A path (the usual case) or a Twisted client endpoint description.

    @param reactor: connects (L{IReactorUNIX}, or as the description says).

    @raise ControlError: a path too long for a UNIX socket, which Twisted
        would fail on with a traceback rather than an error.
    """
    if not socket.startswith("tcp:"):
        path = socket.removeprefix("unix:").split(":", 1)[0]
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ControlError(
                f"{path}: a UNIX socket's path can be at most {MAX_SOCKET_PATH}"
                f" bytes, this one is {len(os.fsencode(path))}",
                EXIT_USAGE,
            )
        if not socket.startswith("unix:"):
            return UNIXClientEndpoint(reactor, socket, timeout=timeout)
    described: IStreamClientEndpoint = clientFromString(reactor, socket)
    return described


async def connect(
    reactor: IReactorCore, socket: str, timeout: float = TIMEOUT
) -> Control:
    """
    Connect to the daemon at C{socket} and greet it.

    @param reactor: connects (see L{client_endpoint}); it must provide
        L{IReactorTime} too, which times the calls out.

    @raise ControlError: no daemon there, or one that does not speak this
        version of the protocol.
    """
    endpoint = client_endpoint(reactor, socket, timeout)
    try:
        protocol = await endpoint.connect(Factory.forProtocol(amp.AMP))
    except ConnectError as e:
        raise _connect_error(socket, e) from None
    assert isinstance(protocol, amp.AMP)  # the factory's
    control = Control(IReactorTime(reactor), protocol, socket, timeout)
    try:
        await control.hello()
    except BaseException:
        control.close()
        raise
    return control


def _connect_error(socket: str, error: ConnectError) -> ControlError:
    # Twisted gives the errno itself for a failed connect(), an OSError
    # for some other failures, nothing for a refused connection.
    os_error = error.osError
    code = os_error.errno if isinstance(os_error, OSError) else os_error
    if code in (errno.EACCES, errno.EPERM):
        return ControlError(
            f"permission denied on {socket}: ngrokctl needs to be in the"
            " socket's group (server.socket_group) or run as root",
            EXIT_PERMISSION,
        )
    if code in (errno.ENOENT, errno.ECONNREFUSED) or code is None:
        return ControlError(
            f"ngrokd is not running (nothing answers on {socket}); start it,"
            " or name its socket with --socket or NGROKD_SOCKET",
            EXIT_NOT_RUNNING,
        )
    return ControlError(f"cannot connect to {socket}: {error}", EXIT_NOT_RUNNING)


class Control:
    """
    One connection to the daemon's control socket.
    """

    def __init__(
        self, reactor: IReactorTime, protocol: amp.AMP, socket: str, timeout: float
    ) -> None:
        self._reactor = reactor
        self._protocol = protocol
        self._socket = socket
        self._timeout = timeout
        self.daemon_version = ""
        self.commands: frozenset[str] = frozenset()

    def close(self) -> None:
        assert self._protocol.transport is not None
        self._protocol.transport.loseConnection()

    async def _call(
        self, command: type[amp.Command], extra_time: float = 0.0, **arguments: Any
    ) -> dict[str, Any]:
        calling: Deferred[dict[str, Any]] = self._protocol.callRemote(
            command, **arguments
        )
        calling.addTimeout(self._timeout + extra_time, self._reactor)
        try:
            return await calling
        except TimeoutError:
            raise ControlError(
                f"ngrokd did not answer within {self._timeout + extra_time:g}s on"
                f" {self._socket}",
                EXIT_TIMEOUT,
            ) from None
        except (ConnectionDone, ConnectionLost):
            raise ControlError(
                f"ngrokd closed the connection on {self._socket}",
                EXIT_NOT_RUNNING,
            ) from None
        except amp.UnknownRemoteError as e:
            raise ControlError(f"ngrokd failed: {e}") from None
        except amp.UnhandledCommand:
            raise ControlError(
                f"ngrokd {self.daemon_version} does not know this command:"
                " upgrade ngrokd, or use the ngrokctl that came with it",
                EXIT_VERSION,
            ) from None
        except NotPermitted as e:
            raise ControlError(str(e), EXIT_PERMISSION) from None
        except TooManyConnections as e:
            raise ControlError(f"ngrokd on {self._socket}: {e}", EXIT_TIMEOUT) from None
        except (KeyRejected, CommandFailed) as e:
            raise ControlError(str(e)) from None

    async def hello(self) -> None:
        answer = await self._call(Hello, version=PROTOCOL_VERSION)
        self.daemon_version = answer["daemon_version"]
        self.commands = frozenset(answer["commands"])
        if answer["version"] != PROTOCOL_VERSION:
            older = "ngrokctl" if answer["version"] > PROTOCOL_VERSION else "ngrokd"
            raise ControlError(
                f"ngrokd {self.daemon_version} speaks control protocol"
                f" {answer['version']}, this ngrokctl {PROTOCOL_VERSION}: upgrade"
                f" {older}",
                EXIT_VERSION,
            )

    async def status(self) -> dict[str, Any]:
        answer = await self._call(Status)
        status: dict[str, Any] = answer["status"]
        return status

    async def endpoints(
        self, search: str = "", state: str = ""
    ) -> AsyncIterator[dict[str, Any]]:
        """
        Every endpoint row (those C{search} and C{state} select, when
        given), a page at a time.
        """
        cursor: int | None = 0
        while cursor is not None:
            page = await self._call(
                ListEndpoints,
                cursor=cursor,
                search=search or None,
                state=state or None,
            )
            for row in page["endpoints"]:
                yield row
            cursor = page.get("next")

    async def events(self, after: int, wait: float) -> tuple[list[dict[str, Any]], int]:
        answer = await self._call(Events, extra_time=wait, after=after, wait=wait)
        return answer["events"], answer["last"]

    async def reload(self) -> dict[str, Any]:
        return await self._call(Reload, extra_time=60.0)

    async def set_api_key(self, key: str) -> str:
        # Trying a key waits for ngrok's API, which has its own timeout.
        answer = await self._call(SetAPIKey, extra_time=60.0, key=key)
        message: str = answer["message"]
        return message
