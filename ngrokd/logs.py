# -*- test-case-name: ngrokd.test.test_logs,ngrokd.test.test_twisted_seams -*-
"""
Honouring C{server.log_level}.

twistd chooses and installs its log observer after the service is built, so
the level cannot be given to it; instead, once logging has begun, every
observer of the publisher is wrapped in a level filter.
"""

from __future__ import annotations

from attrs import frozen
from twisted.application.service import Service
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    globalLogPublisher,
)


def level_named(name: str) -> LogLevel:
    """
    The L{LogLevel} for a config value (C{warning} means C{warn}).
    """
    level: LogLevel = LogLevel.levelWithName({"warning": "warn"}.get(name, name))
    return level


@frozen
class LevelFilter:
    """
    The observers L{restrict_level} wrapped, so that L{undo} can unwrap them.
    """

    publisher: LogPublisher
    wrapped: tuple[tuple[ILogObserver, ILogObserver], ...]
    predicate: LogLevelFilterPredicate

    def set_level(self, level: LogLevel) -> None:
        """
        Let events at C{level} or above through from now on.
        """
        self.predicate.defaultLogLevel = level

    def undo(self) -> None:
        for original, filtered in self.wrapped:
            self.publisher.removeObserver(filtered)
            self.publisher.addObserver(original)


def observers_of(publisher: LogPublisher) -> list[ILogObserver]:
    """
    The observers C{publisher} sends events to now.

    L{LogPublisher} has no public way to list them, so this reads its private
    C{_observers} list: twistd installs its observers after the service is
    built, and only wrapping those honours the configured level.
    """
    return list(publisher._observers)


def restrict_level(
    level: LogLevel, publisher: LogPublisher = globalLogPublisher
) -> LevelFilter:
    """
    From now on, only events at C{level} or above reach C{publisher}'s
    current observers.
    """
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    wrapped = []
    for observer in observers_of(publisher):
        filtered = FilteringLogObserver(observer, [predicate])
        publisher.removeObserver(observer)
        publisher.addObserver(filtered)
        wrapped.append((observer, filtered))
    return LevelFilter(publisher, tuple(wrapped), predicate)


class LogLevelService(Service):
    """
    Applies C{server.log_level} while the daemon runs.
    """

    def __init__(
        self, level: LogLevel, publisher: LogPublisher = globalLogPublisher
    ) -> None:
        self._level = level
        self._publisher = publisher
        self._filter: LevelFilter | None = None

    def startService(self) -> None:
        Service.startService(self)
        self._filter = restrict_level(self._level, self._publisher)

    def set_level(self, level: LogLevel) -> None:
        """
        Apply C{level} from now on (a reloaded C{server.log_level}).
        """
        self._level = level
        if self._filter is not None:
            self._filter.set_level(level)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._filter is not None:
            self._filter.undo()
            self._filter = None
