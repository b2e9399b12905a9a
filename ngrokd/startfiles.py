# -*- test-case-name: ngrokd.test.test_daemon_files -*-
"""
What the daemon reads as it starts, before it serves anything.

The CA bundles the config names (checked when the config was loaded), the
IPv6 block's global ID, the allocations and the last good list: files that
could block (a hung or slow filesystem), so L{read_start_files} runs in the
daemon's file thread and returns them as one value for the reactor thread.
"""

from __future__ import annotations

import os
import stat

from attrs import frozen
from twisted.logger import Logger

from ngrokd.config import SUBNET6_AUTO, SUBNET6_OFF, Config
from ngrokd.host import allocation, ula
from ngrokd.host.allocation import IPNetwork
from ngrokd.ngrok import lastgood
from ngrokd.ngrok.api import ApiEndpoint
from ngrokd.ngrok.trust import (
    PartialChainTrust,
    TrustRoot,
    load_api_trust,
    load_ingress_trust,
)

_log = Logger()


@frozen
class StartFiles:
    """
    What the daemon reads at start, in its file thread.
    """

    api_trust: TrustRoot
    ingress_trust: PartialChainTrust
    subnet6: IPNetwork | None
    #: The global ID C{subnet6} was derived from, when it is new (unsaved).
    new_global_id: int | None
    allocations: allocation.Allocations
    kept: tuple[str, list[ApiEndpoint]] | None


def read_start_files(config: Config) -> StartFiles:
    """
    Read what C{config} names and its state directory holds; warn of a
    client key others may read. This blocks: call it off the reactor
    thread.
    """
    _check_key_mode(config.server.client_key)
    subnet6, new_global_id = _subnet6(config)
    return StartFiles(
        load_api_trust(config.api.ca_bundle),
        load_ingress_trust(config.ingress.ca_bundle),
        subnet6,
        new_global_id,
        allocation.load(config.server.state_dir, config.net.subnet, subnet6=subnet6),
        lastgood.load(config.server.state_dir),
    )


def _check_key_mode(path: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return  # not written yet, or unreadable: the identity says why
    if mode & 0o044:
        _log.warn(
            "the client key {path} is readable by group or others (mode"
            " {mode:04o}): anyone who reads it can use this machine's"
            " bindings; chmod 600 {path}",
            path=path,
            mode=mode,
        )


def _subnet6(config: Config) -> tuple[IPNetwork | None, int | None]:
    """
    C{net.subnet6}; for C{auto}, the block of the global ID kept in the
    state directory, or of a new one, returned beside it (it is saved with
    the allocations). This reads a file: call it off the reactor thread.
    """
    subnet6 = config.net.subnet6
    if subnet6 == SUBNET6_OFF:
        return None, None
    if subnet6 != SUBNET6_AUTO:
        assert not isinstance(subnet6, str)
        return subnet6, None
    global_id = ula.load(config.server.state_dir)
    if global_id is None:
        new = ula.new_global_id()
        return ula.derive(new), new
    return ula.derive(global_id), None
