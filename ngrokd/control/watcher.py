# -*- test-case-name: ngrokd.test.test_reload -*-
"""
Reload the configuration when its file is saved, or on SIGHUP.

On Linux, inotify watches the config's directory (and, for a symbolic
link, the directory of the file it names), so an editor that saves by
writing a new file and renaming it over the old one (vim, and C{ngrokctl
config edit}) is seen, and a file is looked at only once its
writer has closed it: a half-written file is never read. Elsewhere the file
is polled (its inode, size and change time). A burst of events, or of
SIGHUPs (a script that reloads in a loop), becomes one reload once they
have been quiet for a moment.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

#: How long the file must be quiet before a reload, in seconds.
QUIET = 0.5
#: How often the file is looked at where there is no inotify, in seconds.
POLL_INTERVAL = 2.0


def _fingerprint(path: str) -> tuple[int, int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_ino, found.st_size, found.st_ctime_ns)


class ConfigWatcher(Service):
    """
    Calls C{reload} after the file at C{path} changed, or on SIGHUP.

    @param reactor: its timers; with inotify, its file descriptors too; with
        SIGHUP, its wake-up from a signal handler (L{IReactorFromThreads}).
    @param use_inotify: watch with inotify (Linux), else poll.
    @param handle_sighup: install a SIGHUP handler while running (the
        daemon's process does; tests of the watcher alone need not).
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        reload: Callable[[], Deferred[Any]],
        reactor: IReactorTime,
        quiet: float = QUIET,
        use_inotify: bool = sys.platform.startswith("linux"),
        handle_sighup: bool = True,
    ) -> None:
        self._path = os.path.abspath(path)
        self._reload = reload
        self._reactor = reactor
        self._quiet = quiet
        self._use_inotify = use_inotify
        self._handle_sighup = handle_sighup
        self._timer: IDelayedCall | None = None
        self._running: Deferred[Any] | None = None
        self._again = False
        self._why = ""
        self._notifier: Any = None
        self._poller: LoopingCall | None = None
        self._seen: tuple[int, int, int] | None = None
        #: The file the config's path names, links followed.
        self._target = self._path
        self._previous_handler: Any = None
        #: Wakes the reactor from the SIGHUP handler.
        self._from_signal: IReactorFromThreads | None = None

    def startService(self) -> None:
        Service.startService(self)
        if self._use_inotify:
            from twisted.internet import inotify

            self._notifier = inotify.INotify(self._reactor)
            self._notifier.startReading()
            self._watch()
        else:
            self._seen = _fingerprint(self._path)
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self._reactor
            self._poller.start(POLL_INTERVAL, now=False)
        if self._handle_sighup:
            self._from_signal = IReactorFromThreads(self._reactor)
            self._previous_handler = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._handle_sighup:
            signal.signal(signal.SIGHUP, self._previous_handler or signal.SIG_DFL)
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        if self._from_signal is not None:
            self._from_signal.callFromThread(self._settle, "SIGHUP")

    def _watch(self) -> None:
        """
        Watch the config's directory and, when the config is a symbolic
        link, that of the file it names (where C{set-api-key}, C{config
        edit} and configuration management write).
        """
        from twisted.internet import inotify

        self._target = os.path.realpath(self._path)
        for directory in {os.path.dirname(self._path), os.path.dirname(self._target)}:
            try:
                self._notifier.watch(
                    FilePath(directory),
                    mask=inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO,
                    callbacks=[self._notified],
                )
            except inotify.INotifyError as e:
                self.log.warn(
                    "cannot watch {directory} for changes to the config: {error}",
                    directory=directory,
                    error=str(e),
                )

    def _notified(self, ignored: object, path: FilePath[Any], mask: int) -> None:
        if os.fsdecode(path.path) in (self._path, self._target):
            self._watch()  # the link may name another file now
            self._settle(f"{self._path} changed")

    def _poll(self) -> None:
        seen = _fingerprint(self._path)
        if seen != self._seen:
            self._seen = seen
            self._settle(f"{self._path} changed")

    def _settle(self, why: str) -> None:
        """
        Reload, for C{why}, once nothing more has come (a change to the
        file, a SIGHUP) for L{QUIET} seconds: a burst of either is one
        reload.
        """
        self._why = why
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._quiet)
        else:
            self._timer = self._reactor.callLater(self._quiet, self._settled)

    def _settled(self) -> None:
        self.trigger(self._why)

    def trigger(self, why: str) -> None:
        """
        Reload now, or right after the reload under way.
        """
        if not self.running:
            return
        if self._running is not None:
            self._again = True
            return
        self.log.info("reloading the configuration: {why}", why=why)
        self._running = self._reload()
        self._running.addErrback(self._failed).addBoth(self._done)

    def _failed(self, failure: Failure) -> None:
        self.log.failure("reloading the configuration failed", failure)

    def _done(self, _: object) -> None:
        self._running = None
        if self._again:
            self._again = False
            self.trigger("it changed again during the reload")
