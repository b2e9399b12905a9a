# -*- test-case-name: ngrokd.test.test_control -*-
"""
The AMP commands of the control socket, shared by the daemon and C{ngrokctl}.

Versioning: a client calls L{Hello} first and learns the daemon's protocol
version and the commands it answers, so an older or newer C{ngrokctl} says
which side to upgrade instead of failing. New arguments and answers are
added as optional; records travel as JSON objects whose unknown keys a
reader ignores. AMP caps one value at 64 KiB, so lists come in pages
(L{ListEndpoints}) that the daemon fills up to L{PAGE_BYTES}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

#: This side's protocol version; raised when a command changes meaning.
PROTOCOL_VERSION = 1
#: The largest page of records the daemon sends in one answer, in bytes of
#: JSON (AMP's limit per value is 65,535).
PAGE_BYTES = 60_000


class JSON(amp.Argument):
    """
    Any JSON value, as UTF-8 text of at most one AMP value.
    """

    def __init__(self, optional: bool = False) -> None:
        amp.Argument.__init__(self, optional)

    def toString(self, inObject: Any) -> bytes:
        return json.dumps(inObject, separators=(",", ":")).encode("utf-8")

    def fromString(self, inString: bytes) -> Any:
        return json.loads(inString.decode("utf-8"))


class NotPermitted(Exception):
    """
    The caller may not run this command: the message says why and what to do.
    """


class KeyRejected(Exception):
    """
    The API key did not work: the message says what ngrok answered.
    """


class CommandFailed(Exception):
    """
    The command was understood but could not be carried out.
    """


class TooManyConnections(Exception):
    """
    The daemon holds as many control connections as it serves: this one is
    answered with this error, then closed.
    """


#: The error code of L{TooManyConnections}, which the daemon sends itself.
TOO_MANY_CONNECTIONS = b"TOO_MANY_CONNECTIONS"

_ERRORS: dict[type[Exception], bytes] = {
    NotPermitted: b"NOT_PERMITTED",
    KeyRejected: b"KEY_REJECTED",
    CommandFailed: b"FAILED",
    TooManyConnections: TOO_MANY_CONNECTIONS,
}


class Hello(amp.Command):
    """
    Who answers: the daemon's protocol version, its release, and the
    commands it knows.
    """

    arguments = [(b"version", amp.Integer())]
    response = [
        (b"version", amp.Integer()),
        (b"daemon_version", amp.Unicode()),
        (b"commands", amp.ListOf(amp.Unicode())),
    ]
    errors = _ERRORS


class Status(amp.Command):
    """
    The daemon as a whole (L{ngrokd.status.DaemonStatus}, plus where its
    config and socket are), as a JSON object.
    """

    response = [(b"status", JSON())]
    errors = _ERRORS


class ListEndpoints(amp.Command):
    """
    One page of endpoint rows (L{ngrokd.status.EndpointStatus} as JSON
    objects) after C{cursor}; C{next} is the cursor of the following page,
    absent on the last. C{search} keeps the rows whose URL, id or client
    address holds it (any case), C{state} those in that state, as the web
    page's filters do.
    """

    arguments = [
        (b"cursor", amp.Integer(optional=True)),
        (b"limit", amp.Integer(optional=True)),
        (b"search", amp.Unicode(optional=True)),
        (b"state", amp.Unicode(optional=True)),
    ]
    response = [(b"endpoints", JSON()), (b"next", amp.Integer(optional=True))]
    errors = _ERRORS


class Events(amp.Command):
    """
    The events after C{after} (an event id); when there are none yet, wait
    up to C{wait} seconds for some. C{last} is the newest id the daemon
    has, to start following from.
    """

    arguments = [
        (b"after", amp.Integer()),
        (b"wait", amp.Float(optional=True)),
    ]
    response = [(b"events", JSON()), (b"last", amp.Integer())]
    errors = _ERRORS


class SetAPIKey(amp.Command):
    """
    Use this ngrok API key: tried first, then stored in the config file.
    """

    arguments = [(b"key", amp.Unicode())]
    response = [(b"message", amp.Unicode())]
    errors = _ERRORS


class Reload(amp.Command):
    """
    Read the config file again and apply what changed: the keys applied,
    those that wait for a restart, or why nothing changed.
    """

    response = [
        (b"applied", amp.ListOf(amp.Unicode())),
        (b"restart", amp.ListOf(amp.Unicode())),
        (b"error", amp.Unicode()),
    ]
    errors = _ERRORS


#: Every command, by name, as L{Hello} reports them.
COMMANDS: dict[str, type[amp.Command]] = {
    "hello": Hello,
    "status": Status,
    "list": ListEndpoints,
    "events": Events,
    "set-api-key": SetAPIKey,
    "reload": Reload,
}
