# -*- test-case-name: ngrokd.test.test_reload -*-
"""
What a changed configuration means for a running daemon: which changed keys
apply at once, which wait for a restart.

Keys are the config file's dotted names. A key is hot when the daemon can
take its new value without dropping what it serves; every other key (the
subnet, the interface, files and sockets it holds open, where the ingress
is and whether it is verified) is restart-only: a reload reports it by name
and leaves its old value in force, so nothing is half-applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from attrs import frozen

from ngrokd.config import SETTINGS, Config

#: The keys a reload applies at once (their schema says so).
HOT = frozenset(key for key, setting in SETTINGS.items() if setting.hot)

#: Keys whose values are never written to a log.
SECRET = frozenset(key for key, setting in SETTINGS.items() if setting.secret)


def settings(config: Config) -> dict[str, Any]:
    """
    Every setting of C{config}, by the config file's dotted key.
    """
    return {
        key: getattr(getattr(config, setting.section), setting.name)
        for key, setting in SETTINGS.items()
    }


@frozen
class Changes:
    """
    The keys whose values differ, as (old, new), split by when they apply.
    """

    hot: Mapping[str, tuple[Any, Any]]
    restart: Mapping[str, tuple[Any, Any]]

    def __bool__(self) -> bool:
        return bool(self.hot or self.restart)

    def described(self) -> list[str]:
        """
        One line per changed key, secrets named but not shown.
        """
        lines = []
        for key, (old, new) in sorted({**self.hot, **self.restart}.items()):
            when = "" if key in self.hot else " (needs a restart)"
            if key in SECRET:
                lines.append(f"{key} changed{when}")
            else:
                lines.append(f"{key}: {_shown(old)} -> {_shown(new)}{when}")
        return lines


def _shown(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return "(empty)" if value in ("", None) else str(value)


def changes(running: Config, loaded: Config) -> Changes:
    """
    What differs from the C{running} configuration in the C{loaded} one.
    """
    old, new = settings(running), settings(loaded)
    differ = {key: (old[key], new[key]) for key in old if old[key] != new[key]}
    return Changes(
        hot={k: v for k, v in differ.items() if k in HOT},
        restart={k: v for k, v in differ.items() if k not in HOT},
    )


def applied(running: Config, loaded: Config) -> Config:
    """
    The configuration to run with after a reload: C{running} with the hot
    keys of C{loaded}; restart-only keys keep their running values.
    """
    result = running
    new = settings(loaded)
    for key in HOT:
        section, name = SETTINGS[key].section, SETTINGS[key].name
        part = getattr(result, section)
        if getattr(part, name) != new[key]:
            part = attrs.evolve(part, **{name: new[key]})
            result = attrs.evolve(result, **{section: part})
    return result
