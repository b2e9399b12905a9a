# -*- test-case-name: ngrokd.test.test_daemon_net,ngrokd.test.test_reconcile_e2e -*-
"""
The reconcile: one good poll's endpoints made served, step by step.

The decisions are pure and kept (L{ngrokd.replan}, L{ngrokd.plan}); what is
here is their order and the I/O between them: parse, allocate (and
persist), the addresses, the listeners, the names, each step waiting for
the one before, so that a name resolves only once its address and listener
exist. Reconciles never overlap, and of the polls that arrive while one is
applied only the latest is applied next. Large changes are sliced, a turn
of the reactor between slices, so that connections keep flowing.
"""

from __future__ import annotations

import gc
from functools import partial
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ngrokd.atomic import AtomicWriteError
from ngrokd.endpoints import BoundEndpoint
from ngrokd.host import allocation, ula
from ngrokd.host.allocation import IPAddress
from ngrokd.names import name_rules
from ngrokd.ngrok.api import ApiEndpoint
from ngrokd.reactor import IDaemonReactor
from ngrokd.replan import Replanner

if TYPE_CHECKING:
    from ngrokd.daemon import Daemon

#: Endpoints parsed, or status rows made, in one turn of the reactor
#: while a reconcile applies a large change.
ROWS_AT_ONCE = 500
#: With this many endpoints or more, a changed poll's allocations and plan
#: are decided in a thread (pure functions; the reactor carries on).
DECIDE_IN_THREAD = 1000

#: What fails when the allocations cannot be written, for status and the log.
_SAVING = "saving the addresses and ports"


class Applier:
    """
    Applies the polls of one L{Daemon} to its state and the machine.

    @ivar found: the endpoints of the last good poll, applied again when
        the configuration or the way names reach the system changes.
    @ivar addresses: the virtual-mode addresses the last reconcile kept.
    @ivar polled: whether a reconcile has been applied.
    """

    log = Logger()

    def __init__(self, daemon: Daemon, reactor: IDaemonReactor) -> None:
        self._daemon = daemon
        self._reactor = reactor
        #: The last poll's parsed endpoints and decisions.
        self._replan = Replanner()
        self.found: list[ApiEndpoint] | None = None
        self.addresses: frozenset[IPAddress] = frozenset()
        self.polled = False
        self._latest: list[ApiEndpoint] | None = None
        self._applying = False
        self._applied: list[Deferred[None]] = []
        #: The allocations as last saved, and the global ID of the IPv6
        #: block while it is not saved yet.
        self._saved = allocation.Allocations()
        self._unsaved_global_id: int | None = None

    def loaded(self, saved: allocation.Allocations, new_global_id: int | None) -> None:
        """
        The allocations the state directory holds, and the global ID the
        IPv6 block was derived from when it is new: saved with the next
        allocations.
        """
        self._saved = saved
        self._unsaved_global_id = new_global_id

    def reconcile(self, found: list[ApiEndpoint]) -> Deferred[None]:
        """
        Serve exactly the endpoints of one good poll.

        Reconciles never overlap: a result that arrives while one is applied
        waits, and of those waiting only the latest is applied. Fires (never
        fails) once C{found} or a later result is applied; once the daemon
        stops, results are ignored.
        """
        if self._daemon.stopper.begun:
            return succeed(None)
        self._latest = self.found = found
        applied = self.idle()
        if not self._applying:
            self._applying = True
            Deferred.fromCoroutine(self._apply_latest())
        return applied

    def again(self) -> Deferred[None]:
        """
        Serve the last good poll again, as the configuration and the names
        now say.
        """
        if self.found is None:
            return succeed(None)
        return self.reconcile(self.found)

    def idle(self) -> Deferred[None]:
        """
        Fires when no reconcile is being applied (or waits to be). Cancelling
        it stops the wait, not the reconcile.
        """
        if not self._applying and self._latest is None:
            return succeed(None)
        idle: Deferred[None] = Deferred(self._applied.remove)
        self._applied.append(idle)
        return idle

    async def _apply_latest(self) -> None:
        try:
            while self._latest is not None:
                found, self._latest = self._latest, None
                try:
                    await self._apply(found)
                except Exception:
                    self.log.failure("applying the bound endpoints failed")
        finally:
            self._applying = False
            applied, self._applied = self._applied, []
            for d in applied:
                d.callback(None)

    async def _apply(self, found: list[ApiEndpoint]) -> None:
        """
        Allocate (and persist), then set up the addresses (the DNS server's
        too), then listen, then serve the names (the DNS server's table and
        its registration, then the hosts file for what DNS does not serve):
        a name resolves only once its address and listener exist. A name the
        hosts file already sets, or that is otherwise not ours
        (L{ngrokd.names}), gets none of them. Addresses no hostname uses any
        more go last, after their listeners and names.
        """
        daemon = self._daemon
        endpoints, skipped = await self._parse(found)
        daemon.endpoints, daemon.skipped = endpoints, skipped
        daemon.board.reconciled(endpoints, skipped, daemon.plan)
        config = daemon.config
        names = name_rules(config, await daemon.hosts.pinned())
        decide = partial(
            self._replan.decide,
            endpoints,
            daemon.allocations,
            config.net,
            names,
            self._reactor.seconds(),
            daemon.subnet6,
        )
        if len(endpoints) >= DECIDE_IN_THREAD:
            pool = self._reactor.getThreadPool()
            result, planned = await deferToThreadPool(self._reactor, pool, decide)
        else:
            result, planned = decide()
        daemon.allocations = result.allocations
        await self._save_allocations()
        addresses = frozenset(
            [*daemon.allocations.ips.values(), *daemon.allocations.ips6.values()]
        )
        addresses |= daemon.names.own_addresses()
        missing = await daemon.interface.ensure(addresses | self.addresses)
        if self._daemon.stopper.begun:
            # The listeners are closed, and the names go with the stop.
            return
        previous = daemon.plan
        daemon.plan = plan = self._replan.served(
            planned, {str(ip): reason for ip, reason in missing.items()}
        )
        if plan is not previous:
            daemon.board.reconciled(daemon.endpoints, daemon.skipped, plan)
            for url, reason in plan.failures.items():
                if previous.failures.get(url) != reason:
                    self.log.error(
                        "cannot serve {url}: {reason}", url=url, reason=reason
                    )
        await self._make_rows()
        board = daemon.board
        if (
            plan is not previous
            or board.listeners_up < len(plan.specs)
            or board.listeners6_up < len(plan.specs6)
        ):
            # Unchanged and all listening, there is nothing to do.
            await daemon.listeners.reconcile(plan.specs, plan.specs6)
        if self._daemon.stopper.begun:
            await daemon.listeners.stop()
            return
        name_addresses, virtual_names = self._replan.names(plan)
        await daemon.names.apply(name_addresses)
        await daemon.hosts.write(daemon.names.hosts_names(virtual_names))
        board.named(daemon.names.unnamed(list(virtual_names)))
        await self._make_rows()
        if self.addresses - addresses:
            await daemon.interface.ensure(addresses)
        self.addresses = addresses
        self.polled = True
        if plan is not previous and daemon.freeze_after_changes:
            # What a changed reconcile made lives long (listeners, rows):
            # out of the way of the collector, whose full passes over
            # 10,000 endpoints' objects would stop everything for 200 ms.
            gc.collect(1)
            gc.freeze()

    async def _parse(
        self, found: list[ApiEndpoint]
    ) -> tuple[dict[str, BoundEndpoint], dict[str, str]]:
        """
        The endpoints of C{found} by id, and why the others are skipped:
        records unchanged since the last poll keep their parsed endpoint,
        new ones are parsed L{ROWS_AT_ONCE} at a time, with a turn of the
        reactor between. Equal to the last poll's, the last poll's dicts.
        """
        endpoints: dict[str, BoundEndpoint] = {}
        skipped: dict[str, str] = {}
        for start in range(0, len(found), ROWS_AT_ONCE):
            batch = found[start : start + ROWS_AT_ONCE]
            new = self._replan.parse(batch, endpoints, skipped)
            if new and len(found) > ROWS_AT_ONCE:
                await deferLater(self._reactor, 0, lambda: None)
        self._replan.parsed([*endpoints, *skipped])
        last_endpoints, last_skipped = self._daemon.endpoints, self._daemon.skipped
        for id, reason in skipped.items():
            if last_skipped.get(id) != reason:
                self.log.warn("skipping endpoint {id}: {error}", id=id, error=reason)
        if endpoints == last_endpoints:
            endpoints = last_endpoints
        if skipped == last_skipped:
            skipped = last_skipped
        return endpoints, skipped

    async def _make_rows(self) -> None:
        """
        Make the status rows a reconcile changed, L{ROWS_AT_ONCE} at a
        time, with a turn of the reactor between: connections keep flowing
        while thousands change.
        """
        board = self._daemon.board
        board.refresh(ROWS_AT_ONCE)
        while board.pending:
            await deferLater(self._reactor, 0, lambda: None)
            board.refresh(ROWS_AT_ONCE)

    async def _save_allocations(self) -> None:
        """
        Persist the allocations if they changed, off the reactor thread (it
        waits for fsync). When that fails they are used all the same, and
        saving is tried again at the next reconcile.
        """
        daemon = self._daemon
        allocations, global_id = daemon.allocations, self._unsaved_global_id
        if allocations == self._saved and global_id is None:
            daemon.problems.cleared(_SAVING)
            return
        try:
            await deferToThreadPool(
                self._reactor,
                self._reactor.getThreadPool(),
                _save_state,
                daemon.config.server.state_dir,
                allocations,
                global_id,
            )
        except AtomicWriteError as e:
            daemon.problems.failed(
                _SAVING,
                str(e),
                "the addresses and ports given out since the last save may"
                " change at the next start",
            )
            return
        self._saved = allocations
        if self._unsaved_global_id == global_id:
            self._unsaved_global_id = None
        daemon.problems.cleared(_SAVING)


def _save_state(
    state_dir: str, allocations: allocation.Allocations, global_id: int | None
) -> None:
    """
    Save the IPv6 global ID, if new, then the allocations built on it.
    """
    if global_id is not None:
        ula.save(state_dir, global_id)
    allocation.save(state_dir, allocations)
