"""
Tests for L{ngrokd.logs}: C{server.log_level} decides what is logged.
"""

from __future__ import annotations

from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, LogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from ngrokd.logs import LogLevelService, level_named, restrict_level


@implementer(ILogObserver)
class Formats(list[str]):
    """
    Keeps the format of every event it observes.
    """

    def __call__(self, event: LogEvent) -> None:
        self.append(event["log_format"])


class RestrictLevelTests(SynchronousTestCase):
    """
    L{restrict_level} filters what the existing observers see.
    """

    def test_belowLevelDropped(self) -> None:
        """
        At C{warn}, info and debug events are dropped and warnings pass;
        undoing restores everything.
        """
        seen = Formats()
        publisher = LogPublisher(seen)
        log = Logger(observer=publisher)
        restriction = restrict_level(level_named("warning"), publisher)
        log.debug("debug")
        log.info("info")
        log.warn("warn")
        log.error("error")
        restriction.undo()
        log.info("info again")
        self.assertEqual(seen, ["warn", "error", "info again"])

    def test_levelNames(self) -> None:
        """
        Config names map to Twisted's levels.
        """
        self.assertEqual(
            [level_named(n) for n in ("debug", "info", "warn", "warning", "error")],
            [
                LogLevel.debug,
                LogLevel.info,
                LogLevel.warn,
                LogLevel.warn,
                LogLevel.error,
            ],
        )


class LogLevelServiceTests(SynchronousTestCase):
    """
    The daemon's service tree applies the level while it runs.
    """

    def test_appliedWhileRunning(self) -> None:
        """
        Events below the level are dropped between start and stop only.
        """
        seen = Formats()
        publisher = LogPublisher(seen)
        log = Logger(observer=publisher)
        service = LogLevelService(LogLevel.error, publisher)
        service.startService()
        log.warn("while running")
        service.stopService()
        log.warn("after")
        self.assertEqual(seen, ["after"])
