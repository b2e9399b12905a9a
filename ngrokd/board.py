# -*- test-case-name: ngrokd.test.test_board -*-
"""
The status rows, kept rather than rebuilt: what every way of looking at the
daemon reads (C{/status}, C{/metrics}, the web page, the event feed,
C{ngrokctl list}).

L{endpoint_status} makes every row from the daemon's state; with 10,000
endpoints that costs tens of milliseconds of the reactor's time at each
look, during which no connection is accepted or carried. L{StatusBoard}
instead makes one endpoint's row again only where one of its facts changes:
a reconcile that changed the endpoint, its plan or its listeners (IPv4
and IPv6); a listener's bind or failure; a connection's start, failure and
end (the bytes of a connection are counted once, when it ends); whether
its hostname can be reached by name (L{StatusBoard.named}). A reader reads the
rows as they are, through indexes kept with them (L{RowIndex}): the order
by URL, the rows in each state, and the text a name filter searches. A
change counter (L{StatusBoard.version}) and watchers (L{StatusBoard.watch})
let readers do nothing while nothing changed, and only the changed rows'
work when something did.

Two facts are the daemon's, not an endpoint's: while the client
certificate is expired every listening endpoint says so, and while the
endpoints are those an earlier run kept every row is stale. They are kept
once and applied as a row is read, so that they change no row.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs

from ngrokd.endpoints import BoundEndpoint
from ngrokd.plan import Plan
from ngrokd.status import (
    FAILED,
    LISTENING,
    STARTING,
    EndpointStatus,
    ListenerState,
    endpoint_row,
    skipped_row,
)

#: The states rows are indexed by.
STATES = (LISTENING, STARTING, FAILED)

#: A row's place in the order: its URL, then its id.
Key = tuple[str, str]

#: Separates a row's texts in the search text; a filter holding one finds
#: nothing.
_FIELD = "\x00"
_ROW = "\x01"


def _key(row: EndpointStatus) -> Key:
    return (row.url, row.id)


def _text(row: EndpointStatus) -> str:
    return f"{_ROW}{row.url}{_FIELD}{row.id}{_FIELD}{row.client_address}".lower()


class RowIndex:
    """
    Rows by id, with their order by URL then id, the order of the rows in
    each state, and the lowercase text of each row's URL, id and client
    address that a name filter searches (made again at the first search
    after one of those changed, not at each search).
    """

    def __init__(self) -> None:
        self._rows: dict[str, EndpointStatus] = {}
        self._order: list[Key] = []
        self._states: dict[str, list[Key]] = {state: [] for state in STATES}
        self._text = ""
        self._starts: list[int] = []
        self._searchable = True

    @classmethod
    def of(cls, rows: Iterable[EndpointStatus]) -> RowIndex:
        index = cls()
        index.put_many(rows)
        return index

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, id: str) -> EndpointStatus | None:
        return self._rows.get(id)

    def keys(self, state: str = "") -> Sequence[Key]:
        """
        The rows (in C{state}, or all), in order. Read it, do not keep it:
        it changes with the rows.
        """
        return self._states.get(state, ()) if state else self._order

    def count(self, state: str) -> int:
        return len(self._states.get(state, ()))

    def put(self, row: EndpointStatus, place: bool = True) -> bool:
        """
        Keep C{row} in place of the row with its id; whether it differs.
        Without C{place}, the orders are left for L{reorder} to make.
        """
        old = self._rows.get(row.id)
        if old == row:
            return False
        self._rows[row.id] = row
        if not place:
            return True
        key = _key(row)
        if old is None:
            insort(self._order, key)
            insort(self._states[row.state], key)
            self._searchable = False
            return True
        before = _key(old)
        if before != key:
            _remove(self._order, before)
            insort(self._order, key)
        if before != key or old.state != row.state:
            _remove(self._states[old.state], before)
            insort(self._states[row.state], key)
        if before != key or old.client_address != row.client_address:
            self._searchable = False
        return True

    def remove(self, id: str, place: bool = True) -> bool:
        """
        Forget the row of C{id}; whether there was one. Without C{place},
        the orders are left for L{reorder} to make.
        """
        old = self._rows.pop(id, None)
        if old is None or not place:
            return old is not None
        _remove(self._order, _key(old))
        _remove(self._states[old.state], _key(old))
        self._searchable = False
        return True

    def put_many(self, rows: Iterable[EndpointStatus]) -> None:
        """
        Keep many rows at once: the orders are sorted again once, instead
        of each row finding its place.
        """
        for row in rows:
            self._rows[row.id] = row
        self.reorder()

    def reorder(self) -> None:
        """
        Make the orders again from the rows (after many changes, one sort
        costs less than a place found for each).
        """
        self._order = sorted(_key(row) for row in self._rows.values())
        for state in STATES:
            self._states[state] = []
        rows = self._rows
        for key in self._order:
            self._states[rows[key[1]].state].append(key)
        self._searchable = False

    def rows_of(self, ids: Iterable[str]) -> list[EndpointStatus]:
        """
        The rows of C{ids} there are, in that order.
        """
        return [row for row in map(self._rows.get, ids) if row is not None]

    def in_order(self) -> list[EndpointStatus]:
        """
        Every row, in order.
        """
        rows = self._rows
        return [rows[id] for _, id in self._order]

    def matching(self, text: str, state: str = "") -> list[Key]:
        """
        The rows whose URL, id or client address holds C{text} (any case),
        in C{state} (or any), in order: a search of the kept text, which
        touches only the rows found.
        """
        needle = text.lower()
        if _FIELD in needle or _ROW in needle:
            return []
        if not self._searchable:
            self._index_text()
        found: list[Key] = []
        haystack, starts, order = self._text, self._starts, self._order
        position = haystack.find(needle)
        while position >= 0:
            at = bisect_right(starts, position) - 1
            key = order[at]
            if not state or self._rows[key[1]].state == state:
                found.append(key)
            if at + 1 >= len(starts):
                break
            position = haystack.find(needle, starts[at + 1])
        return found

    def _index_text(self) -> None:
        rows = self._rows
        texts = [_text(rows[id]) for _, id in self._order]
        starts, offset = [], 0
        for text in texts:
            starts.append(offset)
            offset += len(text)
        self._text, self._starts = "".join(texts), starts
        self._searchable = True


def _remove(keys: list[Key], key: Key) -> None:
    at = bisect_left(keys, key)
    if at < len(keys) and keys[at] == key:
        del keys[at]


#: The daemon-wide facts every row shows: the certificate problem of every
#: listening endpoint, and whether the rows are stale.
Overlay = Callable[[], tuple[str, bool]]


def _no_overlay() -> tuple[str, bool]:
    return "", False


def shown(row: EndpointStatus, certificate_problem: str, stale: bool) -> EndpointStatus:
    """
    C{row} as it reads with the daemon-wide facts applied.
    """
    if certificate_problem and row.state == LISTENING:
        row = attrs.evolve(row, reason=certificate_problem)
    if stale:
        row = attrs.evolve(row, stale=True)
    return row


class StatusBoard:
    """
    The kept rows of every endpoint, and the counts the daemon's summary
    needs (listeners up, IPv6 ones too, virtual-mode listeners planned).

    The daemon tells it what changed: L{reconciled} with the endpoints, the
    skipped ones and the plan after each step of a reconcile,
    L{listener_changed} with a listener's URL when it (or its IPv6
    listener) listens, fails, stops or counts a connection, and L{named}
    with the hostnames that cannot be reached by name once the names are
    served. Rows a reconcile changed wait in L{pending}
    until L{refresh} makes them, so that a large change can be made in
    slices.
    """

    def __init__(
        self,
        listeners: Callable[[], Mapping[str, ListenerState]],
        overlay: Overlay = _no_overlay,
        listeners6: Callable[[], Mapping[str, ListenerState]] = dict,
    ) -> None:
        """
        @param listeners: the listeners now, by URL.
        @param overlay: the daemon-wide facts now (see L{shown}).
        @param listeners6: the IPv6 listeners now, by URL.
        """
        self._listeners = listeners
        self._listeners6 = listeners6
        self._overlay = overlay
        self._unnamed: Mapping[str, str] = {}
        self._endpoints: Mapping[str, BoundEndpoint] = {}
        self._skipped: Mapping[str, str] = {}
        self._plan = Plan({}, {})
        self._index = RowIndex()
        #: The endpoint ids at each listener URL.
        self._at: dict[str, tuple[str, ...]] = {}
        self._up: set[str] = set()
        self._up6: set[str] = set()
        self._virtual = 0
        self._pending: dict[str, None] = {}
        self._watchers: list[Callable[[str], object]] = []
        self._rows: tuple[EndpointStatus, ...] | None = None
        self._rows_for: tuple[int, str, bool] | None = None
        #: Counts every change of a row.
        self.version = 0

    # What changed

    def watch(self, watcher: Callable[[str], object]) -> None:
        """
        Call C{watcher} with an endpoint's id each time its row changes
        (or goes).
        """
        self._watchers.append(watcher)

    def reconciled(
        self,
        endpoints: Mapping[str, BoundEndpoint],
        skipped: Mapping[str, str],
        plan: Plan,
    ) -> None:
        """
        The endpoints, the skipped ones or the plan may have changed: queue
        the rows of what did (found by comparing, nothing more, so an
        unchanged poll queues nothing).
        """
        changed: set[str] = set()
        old = self._endpoints
        if endpoints is not old:
            for id, endpoint in endpoints.items():
                before = old.get(id)
                if before is not endpoint and before != endpoint:
                    changed.add(id)
                    if before is not None:
                        self._move(id, before.target.url, None)
                    self._move(id, None, endpoint.target.url)
            for id, before in old.items():
                if id not in endpoints:
                    changed.add(id)
                    self._move(id, before.target.url, None)
            self._endpoints = endpoints
        if skipped is not self._skipped:
            changed.update(_differ(self._skipped, skipped))
            self._skipped = skipped
        if plan is not self._plan:
            urls = _differ(self._plan.specs, plan.specs)
            urls.update(_differ(self._plan.failures, plan.failures))
            urls.update(_differ(self._plan.specs6, plan.specs6))
            for url in urls:
                before_spec = self._plan.specs.get(url)
                spec = plan.specs.get(url)
                self._virtual += (spec is not None and spec.virtual) - (
                    before_spec is not None and before_spec.virtual
                )
                changed.update(self._at.get(url, ()))
            self._plan = plan
            for url in urls:
                self._count_up(url)
        self._pending.update(dict.fromkeys(changed))

    def named(self, unnamed: Mapping[str, str]) -> None:
        """
        Why each hostname that cannot be reached by name cannot (see
        L{ngrokd.status.endpoint_status}): queue the rows of the endpoints
        of the hostnames whose reason changed.
        """
        hosts = _differ(self._unnamed, unnamed)
        if not hosts:
            return
        self._unnamed = unnamed
        self._pending.update(
            dict.fromkeys(
                id
                for id, endpoint in self._endpoints.items()
                if endpoint.target.host in hosts
            )
        )

    def _move(self, id: str, before: str | None, after: str | None) -> None:
        if before is not None:
            left = tuple(x for x in self._at.get(before, ()) if x != id)
            if left:
                self._at[before] = left
            else:
                self._at.pop(before, None)
        if after is not None:
            self._at[after] = (*self._at.get(after, ()), id)

    def listener_changed(self, url: str) -> None:
        """
        The listener of C{url} listens, failed, stopped, or counted a
        connection: make its endpoints' rows now.
        """
        self._count_up(url)
        for id in self._at.get(url, ()):
            self._pending.pop(id, None)
            self._make(id)

    def _count_up(self, url: str) -> None:
        for up, specs, listeners in (
            (self._up, self._plan.specs, self._listeners),
            (self._up6, self._plan.specs6, self._listeners6),
        ):
            listener = listeners().get(url)
            if url in specs and listener is not None and listener.listening:
                up.add(url)
            else:
                up.discard(url)

    @property
    def pending(self) -> int:
        """
        How many rows wait to be made.
        """
        return len(self._pending)

    def refresh(self, limit: int | None = None) -> None:
        """
        Make the rows that wait, at most C{limit} of them.
        """
        count = len(self._pending) if limit is None else limit
        many = count > 64 and count > len(self._index) // 4
        for _ in range(min(count, len(self._pending))):
            id = next(iter(self._pending))
            del self._pending[id]
            self._make(id, place=not many)
        if many:
            self._index.reorder()

    def _make(self, id: str, place: bool = True) -> None:
        reason = self._skipped.get(id)
        endpoint = self._endpoints.get(id)
        index = self._index
        if reason is not None:
            row: EndpointStatus | None = skipped_row(id, reason)
        elif endpoint is not None:
            row = endpoint_row(
                endpoint,
                self._plan,
                self._listeners(),
                unnamed=self._unnamed,
                listeners6=self._listeners6(),
            )
        else:
            row = None
        if row is None:
            changed = index.remove(id, place)
        else:
            changed = index.put(row, place)
        if changed:
            self.version += 1
            for watcher in self._watchers:
                watcher(id)

    # Reading

    @property
    def listeners_up(self) -> int:
        """
        The planned listeners that listen.
        """
        return len(self._up)

    @property
    def listeners6_up(self) -> int:
        """
        The planned IPv6 listeners that listen.
        """
        return len(self._up6)

    @property
    def virtual(self) -> int:
        """
        The planned listeners in virtual mode.
        """
        return self._virtual

    def __len__(self) -> int:
        return len(self._index)

    def row(self, id: str) -> EndpointStatus | None:
        row = self._index.row(id)
        if row is None:
            return None
        problem, stale = self._overlay()
        return shown(row, problem, stale) if problem or stale else row

    def keys(self, state: str = "") -> Sequence[Key]:
        return self._index.keys(state)

    def rows_of(self, ids: Iterable[str]) -> list[EndpointStatus]:
        """
        The rows of C{ids} there are, in that order.
        """
        problem, stale = self._overlay()
        found = self._index.rows_of(ids)
        if problem or stale:
            return [shown(row, problem, stale) for row in found]
        return found

    def count(self, state: str) -> int:
        return self._index.count(state)

    def matching(self, text: str, state: str = "") -> list[Key]:
        return self._index.matching(text, state)

    def rows(self) -> tuple[EndpointStatus, ...]:
        """
        Every row, in order (the same tuple until a row changes).
        """
        problem, stale = self._overlay()
        stamp = (self.version, problem, stale)
        if self._rows is None or self._rows_for != stamp:
            kept = self._index.in_order()
            if problem or stale:
                kept = [shown(row, problem, stale) for row in kept]
            self._rows, self._rows_for = tuple(kept), stamp
        return self._rows


def _differ(before: Mapping[str, object], after: Mapping[str, object]) -> set[str]:
    """
    The keys whose values differ between two mappings (identical values are
    not compared further).
    """
    found = {
        key
        for key, value in after.items()
        if (old := before.get(key)) is not value and old != value
    }
    found.update(key for key in before if key not in after)
    return found
