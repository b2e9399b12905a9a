# -*- test-case-name: ngrokd.test.test_lastgood -*-
"""
The endpoints of the last good poll, kept in the state directory.

A daemon restarted while ngrok's API is down would otherwise serve nothing
until the API answers, although the binding ingress (a separate service)
may well carry connections. So every good poll that changes the list is
written to C{endpoints.json} (atomically: a crash leaves the old list or
the new one), and a daemon that starts finds it there, serves it marked
stale, and replaces it with the first good poll. The list belongs to one
operator: another operator's list is never served.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from twisted.logger import Logger

from ngrokd.atomic import write_atomic
from ngrokd.ngrok.answers import ApiEndpoint
from ngrokd.readfile import read_regular

#: The file in the state directory.
LAST_GOOD = "endpoints.json"
#: Not secret (the allocation files name the same hosts).
_MODE = 0o644
#: A larger file is not one ngrokd wrote (10,000 endpoints take ~1 MiB).
MAX_SIZE = 16 * 1024 * 1024

_log = Logger()


def encode(operator_id: str, endpoints: Sequence[ApiEndpoint]) -> bytes:
    return json.dumps(
        {
            "operator_id": operator_id,
            "endpoints": [
                {"id": e.id, "url": e.url, "proto": e.proto} for e in endpoints
            ],
        },
        indent=1,
        sort_keys=True,
    ).encode("utf-8")


def decode(data: bytes) -> tuple[str, list[ApiEndpoint]]:
    """
    @raise ValueError: C{data} is not what L{encode} writes.
    """
    document = json.loads(data.decode("utf-8"))
    operator_id = document.get("operator_id") if isinstance(document, dict) else None
    items = document.get("endpoints") if isinstance(document, dict) else None
    if not isinstance(operator_id, str) or not isinstance(items, list):
        raise ValueError("not an object with operator_id and endpoints")
    endpoints = []
    for item in items:
        fields = item if isinstance(item, dict) else {}
        id, url, proto = (fields.get(k) for k in ("id", "url", "proto"))
        if not (
            isinstance(id, str) and isinstance(url, str) and isinstance(proto, str)
        ):
            raise ValueError(f"not an endpoint: {item!r:.100}")
        endpoints.append(ApiEndpoint(id, url, proto))
    return operator_id, endpoints


def save(state_dir: str, operator_id: str, endpoints: Sequence[ApiEndpoint]) -> None:
    """
    Keep C{endpoints}, the result of a good poll for C{operator_id}. This
    blocks on C{fsync}.

    @raise ngrokd.atomic.AtomicWriteError: naming the file.
    """
    write_atomic(
        os.path.join(state_dir, LAST_GOOD), encode(operator_id, endpoints), _MODE
    )


def load(state_dir: str) -> tuple[str, list[ApiEndpoint]] | None:
    """
    The operator id and the endpoints kept for it, or C{None}: none were
    kept, or the file cannot be used (said in the log; it is replaced at the
    next good poll). This reads a file: call it off the reactor thread.
    """
    path = os.path.join(state_dir, LAST_GOOD)
    try:
        data, _ = read_regular(path, MAX_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        _log.warn("cannot read {path}: {error}", path=path, error=e.strerror)
        return None
    try:
        if len(data) > MAX_SIZE:
            raise ValueError(f"larger than {MAX_SIZE} bytes")
        return decode(data)
    except (UnicodeDecodeError, ValueError) as e:
        _log.warn(
            "{path} is not a list of endpoints ngrokd wrote ({error}); ignoring it",
            path=path,
            error=e,
        )
        return None
