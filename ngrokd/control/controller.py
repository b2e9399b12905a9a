# -*- test-case-name: ngrokd.test.test_control -*-
"""
What the control socket can ask of the daemon, whatever the protocol: the
status, the endpoint rows, and the changes (a new API key, a reload), each
change checked against who is asking.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ngrokd.config import Config
from ngrokd.control.commands import (
    PAGE_BYTES,
    CommandFailed,
    KeyRejected,
    NotPermitted,
)
from ngrokd.control.configfile import api_key_problem, store_api_key
from ngrokd.control.feed import EventFeed
from ngrokd.control.held import REQUESTS
from ngrokd.control.peer import Peer, may_change, refusal
from ngrokd.ngrok.api import APIError, APIResponseInvalid, APIUnavailable, NoAPIKey
from ngrokd.ngrok.identity import IdentityError
from ngrokd.ngrok.identity_service import KeyRejected as OperatorNotInAccount
from ngrokd.status import DaemonStatus, EndpointStatus

#: What an API key can fail with, each said to the user as it is.
_KEY_FAILURES = (
    NoAPIKey,
    APIError,
    APIUnavailable,
    APIResponseInvalid,
    OperatorNotInAccount,
    IdentityError,
)


class SearchedRows(Protocol):
    """
    The kept status rows (L{ngrokd.board.StatusBoard}), as C{ngrokctl list}
    finds them.
    """

    def keys(self, state: str = "") -> Sequence[tuple[str, str]]: ...
    def matching(self, text: str, state: str = "") -> list[tuple[str, str]]: ...
    def rows_of(self, ids: Iterable[str]) -> list[EndpointStatus]: ...


class ReloadOutcome(Protocol):
    """
    What a reload did (L{ngrokd.daemon.ReloadResult}).
    """

    @property
    def applied(self) -> tuple[str, ...]: ...
    @property
    def restart(self) -> tuple[str, ...]: ...
    @property
    def error(self) -> str: ...


class ControlledDaemon(Protocol):
    """
    What the control socket reads from and asks of the daemon
    (L{ngrokd.daemon.Daemon}).
    """

    @property
    def config(self) -> Config: ...
    @property
    def board(self) -> SearchedRows: ...
    def daemon_status(self) -> DaemonStatus: ...
    def endpoint_status(self) -> tuple[EndpointStatus, ...]: ...
    def set_api_key(self, key: str) -> Awaitable[None]: ...
    def reload(self) -> Awaitable[ReloadOutcome]: ...


class Controller:
    """
    What the control socket can ask of the daemon, whatever the protocol.

    @param reactor: runs the config file's write in a thread: it must
        provide L{IReactorThreads}.
    @param admin_gid: members of this group may change the daemon.
    """

    log = Logger()

    def __init__(
        self,
        daemon: ControlledDaemon,
        feed: EventFeed,
        reactor: IReactorCore,
        socket_description: str,
        admin_gid: int | None = None,
    ) -> None:
        self.daemon = daemon
        self.feed = feed
        self._reactor = reactor
        self._socket = socket_description
        self.admin_gid = admin_gid
        #: The daemon's own user, who may always change it.
        self.daemon_uid = os.geteuid()

    def status(self) -> dict[str, Any]:
        with REQUESTS.timing("ngrokctl status"):
            status = self.daemon.daemon_status()
            fields = attrs.asdict(status)
            fields.update(
                ready=status.ready,
                not_ready_because=status.not_ready_because,
                registered=status.registered,
                uptime=status.uptime,
                config_path=self.daemon.config.path,
                socket=self._socket,
            )
            return fields

    def rows(self, search: str = "", state: str = "") -> tuple[EndpointStatus, ...]:
        """
        Every endpoint's row: the kept rows as they are now (the same tuple
        while none changes); with C{search} or C{state}, those the board's
        indexes find (as the web page's filters), in the same order.
        """
        if not search and not state:
            return self.daemon.endpoint_status()
        board = self.daemon.board
        keys = board.matching(search, state) if search else board.keys(state)
        return tuple(board.rows_of(id for _, id in keys))

    def page(
        self, rows: Sequence[EndpointStatus], start: int, limit: int
    ) -> list[dict[str, Any]]:
        """
        The records of the page of C{rows} that begins at C{start}: at most
        C{limit} rows whose JSON fits in L{PAGE_BYTES}, and at least one.
        Only the rows of the page are read.
        """
        with REQUESTS.timing("ngrokctl list"):
            page: list[dict[str, Any]] = []
            size = 2
            for row in rows[start : start + limit]:
                record = attrs.asdict(row)
                size += len(json.dumps(record, separators=(",", ":"))) + 1
                if size > PAGE_BYTES and page:
                    break
                page.append(record)
            return page

    def check_change(self, peer: Peer | None, command: str) -> None:
        """
        @raise NotPermitted: C{peer} may not change the daemon.
        """
        if peer is None:
            raise NotPermitted(
                f"{command} changes the daemon, and the control socket"
                f" {self._socket} cannot tell who is calling (over TCP nobody"
                " can be told), so it answers reads only: run ngrokctl against"
                " a UNIX socket (server.socket_path) to change the daemon"
            )
        if may_change(peer, self.daemon_uid, self.admin_gid):
            return
        server = self.daemon.config.server
        raise NotPermitted(
            refusal(command, server.admin_group, self.daemon.config.path)
        )

    async def set_api_key(self, peer: Peer | None, key: str) -> str:
        """
        Try C{key}, use it, then store it in the config file.

        @raise NotPermitted: see L{check_change}.
        @raise KeyRejected: the key does not work; nothing changed.
        @raise CommandFailed: the key works and is in use, but was not saved.
        """
        self.check_change(peer, "set-api-key")
        problem = api_key_problem(key.strip())
        if problem is not None:
            raise KeyRejected(f"refusing the API key: {problem}")
        try:
            await self.daemon.set_api_key(key)
        except _KEY_FAILURES as e:
            raise KeyRejected(f"the API key was not accepted: {e}") from None
        path = self.daemon.config.path
        try:
            threads = IReactorThreads(self._reactor)
            former = await deferToThreadPool(
                threads,
                threads.getThreadPool(),
                store_api_key,
                path,
                key.strip(),
            )
        except Exception as e:
            self.log.failure("cannot save the API key in {path}", path=path)
            raise CommandFailed(
                f"the API key works and is in use, but could not be saved in"
                f" {path} ({e}): it will be lost at the next start"
            ) from None
        self.log.info("the new API key is saved in {path}", path=path)
        saved = f"the API key works and is saved in {path}"
        if former is None:
            return saved
        self.log.warn(
            "{path} let group or others read or write it (mode {former:04o}):"
            " now {mode:04o}, as it holds the API key",
            path=path,
            former=former,
            mode=former & ~0o077,
        )
        return (
            f"{saved}; it let group or others read or write it (mode"
            f" {former:04o}): now {former & ~0o077:04o}, as it holds the key"
        )

    async def reload(self, peer: Peer | None) -> dict[str, Any]:
        """
        Reload the daemon's configuration.

        @raise NotPermitted: see L{check_change}.
        """
        self.check_change(peer, "reload")
        result = await self.daemon.reload()
        return {
            "applied": list(result.applied),
            "restart": list(result.restart),
            "error": result.error,
        }
