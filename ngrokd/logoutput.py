# -*- test-case-name: ngrokd.test.test_logoutput -*-
"""
How the log is written: text lines or JSON lines (C{server.log_format}),
each line starting with its syslog priority when the output is the systemd
journal, so that C{journalctl -p warning} finds the warnings.

twistd builds its log observer from a zero-argument factory named by its
C{--logger} option, after the options are parsed and before the service
starts; the daemon's options (L{choose}) name one of the two factories
here, by format, when twistd was not told to log anywhere else.

Twisted's own C{jsonFileLogObserver} writes events for Twisted to read back:
the level as a tagged object, every field again under C{log_flattened}, and
an exception given as a field as C{{"unpersistable": true}}. The JSON lines
here are for log collectors instead: the level by name, the message as
text, every field as plain JSON (an exception as its message, bytes
decoded, a failure as its traceback), never an error for a field that JSON
has no type for.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from functools import partial
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)

#: sd-daemon(3) priorities (C{<3>} is err, C{<4>} warning, C{<6>} info,
#: C{<7>} debug); the journal takes them off the line and files the line
#: under them.
_PRIORITIES = {
    LogLevel.critical: 3,
    LogLevel.error: 3,
    LogLevel.warn: 4,
    LogLevel.info: 6,
    LogLevel.debug: 7,
}

#: How deep lists and mappings in a field are written out; deeper values
#: (and a list that holds itself) are written as their text.
_DEPTH = 4

#: The factory twistd's C{--logger} names for each format.
_FACTORIES = {
    "text": "ngrokd.logoutput.text_observer",
    "json": "ngrokd.logoutput.json_observer",
}

Render = Callable[[LogEvent], "str | None"]


def text_line(event: LogEvent) -> str | None:
    """
    The event as twistd writes it by default: time, C{[namespace#level]}
    and the message (continuation lines start with a tab).
    """
    return formatEventAsClassicLogText(
        event, formatTime=partial(formatTime, timeFormat=timeFormatRFC3339)
    )


def json_line(event: LogEvent) -> str:
    """
    The event as one line of JSON: C{log_time} (seconds since the epoch),
    C{log_level}, C{log_namespace}, C{log_format}, C{log_text} (the message),
    C{log_traceback} for a failure, and every field of the event.
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "log_time": event.get("log_time"),
        "log_level": None if level is None else level.name,
        "log_namespace": event.get("log_namespace"),
        "log_format": event.get("log_format"),
        "log_text": formatEvent(event),
    }
    if "log_system" in event:
        record["log_system"] = _plain(event["log_system"], 0)
    failure = event.get("log_failure")
    if failure is not None:
        record["log_traceback"] = _text(failure.getTraceback)
    for key, value in event.items():
        if not key.startswith("log_"):
            record[key] = _plain(value, 0)
    return json.dumps(record, allow_nan=False) + "\n"


def _plain(value: object, depth: int) -> object:
    """
    C{value} as a value JSON has: strings, numbers, booleans and null as
    they are, lists and mappings (to L{_DEPTH}) item by item, everything
    else as its text.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if depth < _DEPTH:
        if isinstance(value, Mapping):
            return {str(k): _plain(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [_plain(v, depth + 1) for v in value]
    return _text(partial(str, value))


def _text(make: Callable[[], str]) -> str:
    try:
        return make()
    except Exception as e:
        return f"(cannot be shown: {type(e).__name__})"


def with_priority(render: Render) -> Render:
    """
    C{render}, with every line of the event starting with the priority of
    its level, as the journal reads them.
    """

    def prefixed(event: LogEvent) -> str | None:
        text = render(event)
        if text is None:
            return None
        priority = f"<{_PRIORITIES.get(event.get('log_level'), 6)}>"
        return "".join(priority + line for line in text.splitlines(keepends=True))

    return prefixed


def is_journal(environ: Mapping[str, str], stream: IO[str]) -> bool:
    """
    Whether C{stream} is the journal: systemd names the journal's stream in
    C{JOURNAL_STREAM} (C{DEVICE:INODE}) for the processes it connects to it.
    """
    named = environ.get("JOURNAL_STREAM", "")
    if not named:
        return False
    try:
        found = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False  # not a file (a test's StringIO), or closed
    return named == f"{found.st_dev}:{found.st_ino}"


def observer_for(
    log_format: str, stream: IO[str], environ: Mapping[str, str]
) -> ILogObserver:
    """
    The observer that writes to C{stream} in C{log_format}.
    """
    render: Render = json_line if log_format == "json" else text_line
    if is_journal(environ, stream):
        render = with_priority(render)
    return FileLogObserver(stream, render)


def text_observer() -> ILogObserver:
    """
    twistd's C{--logger} factory for C{server.log_format: text}.
    """
    return observer_for("text", sys.stdout, os.environ)


def json_observer() -> ILogObserver:
    """
    twistd's C{--logger} factory for C{server.log_format: json}.
    """
    return observer_for("json", sys.stdout, os.environ)


def choose(twistd_options: MutableMapping[str, Any], log_format: str) -> None:
    """
    Have twistd write its log in C{log_format} to its standard output: when
    it runs in the foreground and was not told to log otherwise (C{--logger},
    C{--syslog}, or a C{--logfile} other than C{-}), its C{--logger} is set
    to that format's factory. Called while twistd's options are parsed, before
    twistd reads them.
    """
    if twistd_options.get("logger") is not None or twistd_options.get("syslog"):
        return
    if twistd_options.get("logfile") not in (None, "", "-"):
        return
    if not twistd_options.get("nodaemon"):
        return
    twistd_options["logger"] = _FACTORIES[log_format]
