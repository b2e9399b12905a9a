"""
Tests for L{ngrokd.host.allocator} and L{ngrokd.host.allocation}.
"""

from __future__ import annotations

import os
import stat
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from ngrokd.host.allocation import (
    IP6_MAPPINGS,
    IP_MAPPINGS,
    NETWORK_PORTS,
    RELEASED,
    decode_network_ports,
    encode_ips,
    encode_network_ports,
    load,
    save,
)
from ngrokd.host.allocator import Allocations, allocate, is_usable

SUBNET = ip_network("10.107.0.0/16")
SUBNET6 = ip_network("fd6e:6772:6f6b::/64")
#: 2024-05-06T07:08:09Z
NOW = 1714979289.0


def ip(text: str) -> IPv4Address | IPv6Address:
    return ip_address(text)


def ips(result: Allocations) -> dict[str, str]:
    return {hostname: str(address) for hostname, address in result.ips.items()}


class AllocateIPv6Tests(SynchronousTestCase):
    """
    With net.subnet6, each hostname also gets an IPv6 address, by the same
    rules as its IPv4 one.
    """

    def test_bothFamilies(self) -> None:
        """
        Every wanted hostname gets an IPv4 and an IPv6 address, from .2 and
        ::2 on, in sorted order; without net.subnet6 none has IPv6.
        """
        result = allocate(
            Allocations(), ["b.ns", "a.ns"], [], SUBNET, 9080, subnet6=SUBNET6
        )
        self.assertEqual(
            ips(result.allocations), {"a.ns": "10.107.0.2", "b.ns": "10.107.0.3"}
        )
        self.assertEqual(
            {h: str(a) for h, a in result.allocations.ips6.items()},
            {"a.ns": "fd6e:6772:6f6b::2", "b.ns": "fd6e:6772:6f6b::3"},
        )
        without = allocate(result.allocations, ["a.ns", "b.ns"], [], SUBNET, 9080)
        self.assertEqual(without.allocations.ips6, {})

    def test_stableAndHeld(self) -> None:
        """
        A hostname keeps its IPv6 address across allocations; one given up
        is held back from a newcomer for net.reuse_after, and given back to
        its hostname when it returns.
        """
        first = allocate(
            Allocations(), ["a.ns", "b.ns"], [], SUBNET, 9080, subnet6=SUBNET6
        ).allocations
        second = allocate(
            first, ["b.ns", "c.ns"], [], SUBNET, 9080, now=NOW, hold=60, subnet6=SUBNET6
        ).allocations
        self.assertEqual(second.ips6["b.ns"], first.ips6["b.ns"])
        self.assertEqual(str(second.ips6["c.ns"]), "fd6e:6772:6f6b::4")
        self.assertEqual(second.released_ips6, {"a.ns": (first.ips6["a.ns"], NOW)})
        third = allocate(
            second,
            ["a.ns", "b.ns", "c.ns"],
            [],
            SUBNET,
            9080,
            now=NOW + 1,
            hold=60,
            subnet6=SUBNET6,
        ).allocations
        self.assertEqual(third.ips6["a.ns"], first.ips6["a.ns"])

    def test_fullSubnet6IsNoError(self) -> None:
        """
        A hostname left without an IPv6 address (a /120 is full) keeps its
        IPv4 one and is no error: it is served over IPv4.
        """
        names = [f"h{i:03}.ns" for i in range(256)]
        result = allocate(
            Allocations(),
            names,
            [],
            ip_network("10.0.0.0/16"),
            9080,
            subnet6=ip_network("fd00::/120"),
        )
        self.assertEqual(len(result.allocations.ips), 256)
        self.assertEqual(len(result.allocations.ips6), 254)
        self.assertEqual(result.errors, {})


class AllocateIPsTests(SynchronousTestCase):
    """
    Each hostname gets an address of its own, from .2 of the subnet on.
    """

    def test_firstFromDotTwoInSortedOrder(self) -> None:
        """
        New hostnames get addresses from .2 on (.1 is the gateway), in
        hostname order whatever order they are given in.
        """
        result = allocate(Allocations(), ["db.ns", "api.ns"], [], SUBNET, 9080)
        self.assertEqual(
            ips(result.allocations), {"api.ns": "10.107.0.2", "db.ns": "10.107.0.3"}
        )
        self.assertEqual(result.errors, {})

    def test_keepsPreviousAndFillsGaps(self) -> None:
        """
        A hostname keeps its address; a newcomer gets the lowest free one.
        """
        previous = Allocations({"b.ns": ip("10.107.0.3"), "c.ns": ip("10.107.0.5")})
        result = allocate(previous, ["c.ns", "b.ns", "a.ns", "d.ns"], [], SUBNET, 9080)
        self.assertEqual(
            ips(result.allocations),
            {
                "a.ns": "10.107.0.2",
                "b.ns": "10.107.0.3",
                "c.ns": "10.107.0.5",
                "d.ns": "10.107.0.4",
            },
        )

    def test_releasedWhenNoLongerWanted(self) -> None:
        """
        A hostname no longer wanted loses its address, which a newcomer can
        then get; the other hostnames keep theirs.
        """
        previous = Allocations({"a.ns": ip("10.107.0.2"), "b.ns": ip("10.107.0.3")})
        result = allocate(previous, ["b.ns", "c.ns"], [], SUBNET, 9080)
        self.assertEqual(
            ips(result.allocations), {"b.ns": "10.107.0.3", "c.ns": "10.107.0.2"}
        )

    def test_sharedPreviousAddressSplit(self) -> None:
        """
        When the saved state gives two hostnames one address (as the
        original's allocator did), the first in sorted order keeps it and the
        other gets its own.
        """
        previous = Allocations({"db.ns": ip("10.107.0.2"), "api.ns": ip("10.107.0.2")})
        result = allocate(previous, ["api.ns", "db.ns"], [], SUBNET, 9080)
        self.assertEqual(
            ips(result.allocations), {"api.ns": "10.107.0.2", "db.ns": "10.107.0.3"}
        )

    def test_previousOutsideSubnetMoved(self) -> None:
        """
        An address the subnet no longer holds, or one of its reserved
        addresses, is replaced by a usable one.
        """
        previous = Allocations(
            {
                "a.ns": ip("10.200.0.2"),
                "b.ns": ip("10.107.0.1"),
                "c.ns": ip("10.107.255.255"),
                "d.ns": ip("fd00::2"),
            }
        )
        result = allocate(previous, ["a.ns", "b.ns", "c.ns", "d.ns"], [], SUBNET, 9080)
        self.assertEqual(
            ips(result.allocations),
            {
                "a.ns": "10.107.0.2",
                "b.ns": "10.107.0.3",
                "c.ns": "10.107.0.4",
                "d.ns": "10.107.0.5",
            },
        )

    def test_exhaustionIsPerHostname(self) -> None:
        """
        When the subnet is full, the hostnames left over are reported by name
        and all the others are still allocated.
        """
        subnet = ip_network("10.107.0.0/29")
        names = [f"h{n}.ns" for n in range(7)]
        result = allocate(Allocations(), names, [], subnet, 9080)
        self.assertEqual(
            ips(result.allocations),
            {f"h{n}.ns": f"10.107.0.{n + 2}" for n in range(5)},
        )
        self.assertEqual(set(result.errors), {"h5.ns", "h6.ns"})
        self.assertIn("h5.ns", result.errors["h5.ns"])
        self.assertIn("10.107.0.0/29", result.errors["h5.ns"])

    def test_tinySubnetHasNoAddresses(self) -> None:
        """
        A /31 or /32 has no address beyond its network and gateway: every
        hostname is an error, and nothing is allocated.
        """
        for subnet in ("10.107.0.0/31", "10.107.0.0/32"):
            result = allocate(Allocations(), ["a.ns"], [], ip_network(subnet), 9080)
            self.assertEqual(result.allocations.ips, {})
            self.assertEqual(list(result.errors), ["a.ns"])

    def test_ipv6(self) -> None:
        """
        An IPv6 subnet works the same way, from ::2, including its last
        address (IPv6 has no broadcast address).
        """
        result = allocate(
            Allocations(), ["b.ns", "a.ns"], [], ip_network("fd00:6e67::/64"), 1
        )
        self.assertEqual(
            ips(result.allocations), {"a.ns": "fd00:6e67::2", "b.ns": "fd00:6e67::3"}
        )
        subnet = ip_network("fd00::/126")
        result = allocate(Allocations(), ["a.ns", "b.ns"], [], subnet, 1)
        self.assertEqual(
            ips(result.allocations), {"a.ns": "fd00::2", "b.ns": "fd00::3"}
        )

    def test_loopbackRange(self) -> None:
        """
        In 127.0.0.0/8 the first address is 127.0.0.2: 127.0.0.1 stays the
        machine's own.
        """
        result = allocate(Allocations(), ["a.ns"], [], ip_network("127.0.0.0/8"), 1)
        self.assertEqual(ips(result.allocations), {"a.ns": "127.0.0.2"})

    def test_nonAlignedSubnet(self) -> None:
        """
        A subnet that does not start at a .0 address is not full while it
        has room (fault 33 of the original).
        """
        result = allocate(Allocations(), ["a.ns"], [], ip_network("10.107.0.64/26"), 1)
        self.assertEqual(ips(result.allocations), {"a.ns": "10.107.0.66"})


class AllocatePortsTests(SynchronousTestCase):
    """
    Each (hostname, port) gets a network port of its own from start_port.
    """

    def test_perEndpointFromStartPort(self) -> None:
        """
        Two endpoints of one hostname get two ports (fault 14 of the
        original), in sorted order from start_port.
        """
        wanted = [("db.ns", 5432), ("api.ns", 80), ("api.ns", 443)]
        result = allocate(Allocations(), [], wanted, SUBNET, 9080)
        self.assertEqual(
            result.allocations.network_ports,
            {("api.ns", 80): 9080, ("api.ns", 443): 9081, ("db.ns", 5432): 9082},
        )
        self.assertEqual(result.allocations.ips, {})

    def test_keptAndReleased(self) -> None:
        """
        An endpoint keeps its port; a removed one frees its port for a
        newcomer.
        """
        previous = Allocations(network_ports={("a.ns", 80): 9080, ("b.ns", 80): 9081})
        result = allocate(previous, [], [("b.ns", 80), ("c.ns", 80)], SUBNET, 9080)
        self.assertEqual(
            result.allocations.network_ports, {("b.ns", 80): 9081, ("c.ns", 80): 9080}
        )

    def test_startPortChangeMovesPortsBelowIt(self) -> None:
        """
        Ports below a raised start_port are given new ones: the setting takes
        effect (fault 10 of the original). Ports within range stay.
        """
        previous = Allocations(network_ports={("a.ns", 80): 9080, ("b.ns", 80): 20005})
        result = allocate(previous, [], [("a.ns", 80), ("b.ns", 80)], SUBNET, 20000)
        self.assertEqual(
            result.allocations.network_ports, {("a.ns", 80): 20000, ("b.ns", 80): 20005}
        )

    def test_cappedAt65535(self) -> None:
        """
        No port above 65535 is given out; the endpoints left over are
        reported, keyed by (hostname, port).
        """
        wanted = [("a.ns", 1), ("a.ns", 2), ("a.ns", 3)]
        result = allocate(Allocations(), [], wanted, SUBNET, 65534)
        self.assertEqual(
            result.allocations.network_ports, {("a.ns", 1): 65534, ("a.ns", 2): 65535}
        )
        self.assertEqual(list(result.errors), [("a.ns", 3)])
        self.assertIn("a.ns:3", result.errors[("a.ns", 3)])

    def test_legacyPortGoesToLowestEndpoint(self) -> None:
        """
        A port from the original's hostname-keyed file goes to that
        hostname's lowest endpoint port and is not kept as a legacy entry.
        """
        previous = Allocations(legacy_network_ports={"a.ns": 9100, "gone.ns": 9101})
        result = allocate(previous, [], [("a.ns", 5432), ("a.ns", 80)], SUBNET, 9080)
        self.assertEqual(
            result.allocations,
            Allocations(network_ports={("a.ns", 80): 9100, ("a.ns", 5432): 9080}),
        )

    def test_keyedPortWinsOverLegacy(self) -> None:
        """
        A legacy port another endpoint already has is not given twice.
        """
        previous = Allocations(
            network_ports={("b.ns", 80): 9100}, legacy_network_ports={"a.ns": 9100}
        )
        result = allocate(previous, [], [("a.ns", 80), ("b.ns", 80)], SUBNET, 9080)
        self.assertEqual(
            result.allocations.network_ports, {("a.ns", 80): 9080, ("b.ns", 80): 9100}
        )


hostnames = st.sampled_from([f"h{n}.ns" for n in range(12)])
endpoint_keys = st.tuples(hostnames, st.sampled_from([80, 443, 5432, 8080]))
subnets = st.sampled_from(
    [ip_network("10.107.0.0/29"), ip_network("10.107.0.0/16"), ip_network("fd00::/125")]
)


class HoldTests(SynchronousTestCase):
    """
    What an endpoint gives up is held back from others for a while.
    """

    def test_releasedPortHeld(self) -> None:
        """
        A port given up in a poll is not given to a newcomer of the same
        poll, nor later within the hold; the endpoint that had it gets it
        back; after the hold it is free again.
        """
        previous = Allocations(network_ports={("a.ns", 80): 9080, ("b.ns", 80): 9081})
        first = allocate(
            previous, [], [("b.ns", 80), ("c.ns", 80)], SUBNET, 9080, NOW, 60
        )
        self.assertEqual(
            first.allocations.network_ports, {("b.ns", 80): 9081, ("c.ns", 80): 9082}
        )
        self.assertEqual(first.allocations.released_ports, {("a.ns", 80): (9080, NOW)})
        wanted = [("b.ns", 80), ("c.ns", 80), ("d.ns", 80)]
        later = allocate(first.allocations, [], wanted, SUBNET, 9080, NOW + 59, 60)
        self.assertEqual(later.allocations.network_ports[("d.ns", 80)], 9083)
        back = allocate(
            later.allocations, [], [*wanted, ("a.ns", 80)], SUBNET, 9080, NOW + 59, 60
        )
        self.assertEqual(back.allocations.network_ports[("a.ns", 80)], 9080)
        self.assertEqual(back.allocations.released_ports, {})
        expired = allocate(
            later.allocations, [], [*wanted, ("e.ns", 80)], SUBNET, 9080, NOW + 60, 60
        )
        self.assertEqual(expired.allocations.network_ports[("e.ns", 80)], 9080)
        self.assertEqual(expired.allocations.released_ports, {})

    def test_releasedAddressHeld(self) -> None:
        """
        The same for addresses.
        """
        previous = Allocations({"a.ns": ip("10.107.0.2"), "b.ns": ip("10.107.0.3")})
        result = allocate(previous, ["b.ns", "c.ns"], [], SUBNET, 9080, NOW, 60)
        self.assertEqual(
            ips(result.allocations), {"b.ns": "10.107.0.3", "c.ns": "10.107.0.4"}
        )
        self.assertEqual(
            result.allocations.released_ips, {"a.ns": (ip("10.107.0.2"), NOW)}
        )

    def test_heldGivenWhenNothingElseLeft(self) -> None:
        """
        When the range is exhausted, a held value is given rather than none.
        """
        previous = Allocations(network_ports={("a.ns", 80): 65534, ("b.ns", 80): 65535})
        result = allocate(
            previous, [], [("b.ns", 80), ("c.ns", 80)], SUBNET, 65534, NOW, 60
        )
        self.assertEqual(
            result.allocations.network_ports, {("b.ns", 80): 65535, ("c.ns", 80): 65534}
        )
        self.assertEqual(result.errors, {})
        self.assertEqual(result.allocations.released_ports, {})

    def test_noHold(self) -> None:
        """
        With no hold, what is given up is free at once and nothing is kept.
        """
        previous = Allocations(network_ports={("a.ns", 80): 9080})
        result = allocate(previous, [], [("c.ns", 80)], SUBNET, 9080, NOW, 0)
        self.assertEqual(result.allocations.network_ports, {("c.ns", 80): 9080})
        self.assertEqual(result.allocations.released_ports, {})

    @given(
        st.lists(st.lists(endpoint_keys, max_size=12), min_size=1, max_size=5),
        st.lists(st.floats(0, 100), min_size=5, max_size=5),
    )
    def test_heldNeverGivenWhileOthersFree(self, rounds, steps) -> None:
        """
        Over any sequence of polls, a port held for one endpoint goes to
        another only when the range has no other free port.
        """
        allocations, now, start = Allocations(), NOW, 65520
        for wanted, step in zip(rounds, steps, strict=False):
            now += step
            held = {
                port: key
                for key, (port, when) in allocations.released_ports.items()
                if now - when < 60
            }
            result = allocate(allocations, [], wanted, SUBNET, start, now, 60)
            new = result.allocations
            free = set(range(start, 65536)) - set(new.network_ports.values())
            released = {port for port, _ in new.released_ports.values()}
            for key, port in new.network_ports.items():
                if port in held and held[port] != key:
                    self.assertEqual(free - set(held) - released, set(), (key, port))
            self.assertEqual(set(new.released_ports) & set(new.network_ports), set())
            allocations = new


class AllocationPropertyTests(SynchronousTestCase):
    """
    Properties that hold for any sequence of allocations.
    """

    def assertConsistent(self, result, wanted_ips, wanted_ports, subnet, start_port):
        """
        No two hostnames share an address, no two endpoints a port; what is
        wanted is allocated or reported, and nothing else is kept.
        """
        new = result.allocations
        self.assertEqual(len(set(new.ips.values())), len(new.ips))
        self.assertEqual(len(set(new.network_ports.values())), len(new.network_ports))
        self.assertTrue(all(is_usable(a, subnet) for a in new.ips.values()))
        self.assertTrue(
            all(start_port <= p <= 65535 for p in new.network_ports.values())
        )
        ip_errors = {e for e in result.errors if isinstance(e, str)}
        port_errors = {e for e in result.errors if isinstance(e, tuple)}
        self.assertEqual(set(new.ips) | ip_errors, set(wanted_ips))
        self.assertEqual(set(new.ips) & ip_errors, set())
        self.assertEqual(set(new.network_ports) | port_errors, set(wanted_ports))
        self.assertEqual(set(new.network_ports) & port_errors, set())
        self.assertEqual(new.legacy_network_ports, {})

    @given(
        subnets,
        st.lists(st.lists(hostnames, max_size=12), min_size=1, max_size=4),
        st.lists(st.lists(endpoint_keys, max_size=12), min_size=1, max_size=4),
        st.integers(65520, 65533),
    )
    def test_neverShared(self, subnet, ip_rounds, port_rounds, start_port) -> None:
        """
        Over any sequence of changes, no two hostnames share an address, no
        two endpoints a port; everything wanted is allocated or reported;
        nothing unwanted is kept; a hostname or endpoint keeps what it had.
        """
        allocations = Allocations()
        for wanted_ips, wanted_ports in zip(ip_rounds, port_rounds, strict=False):
            result = allocate(allocations, wanted_ips, wanted_ports, subnet, start_port)
            self.assertConsistent(result, wanted_ips, wanted_ports, subnet, start_port)
            new = result.allocations
            for hostname in set(wanted_ips) & set(allocations.ips):
                self.assertEqual(new.ips[hostname], allocations.ips[hostname])
            for key in set(wanted_ports) & set(allocations.network_ports):
                self.assertEqual(new.network_ports[key], allocations.network_ports[key])
            allocations = new

    @given(
        subnets,
        st.lists(hostnames, max_size=12),
        st.lists(endpoint_keys, max_size=12),
        st.dictionaries(
            hostnames, st.integers(0, 9).map(lambda n: ip(f"10.107.0.{n}"))
        ),
        st.dictionaries(endpoint_keys, st.integers(9075, 9085)),
        st.dictionaries(hostnames, st.integers(9075, 9085)),
        st.randoms(use_true_random=False),
    )
    def test_orderAndRepetition(
        self, subnet, wanted_ips, wanted_ports, old_ips, old_ports, legacy, random
    ) -> None:
        """
        The result does not depend on the order of what is wanted, even when
        the previous state is odd (shared, reserved or foreign addresses,
        shared or out-of-range ports); allocating again with the same wishes
        changes nothing.
        """
        before = Allocations(old_ips, old_ports, legacy)
        result = allocate(before, wanted_ips, wanted_ports, subnet, 9080)
        self.assertConsistent(result, wanted_ips, wanted_ports, subnet, 9080)
        shuffled_ips, shuffled_ports = list(wanted_ips), list(wanted_ports)
        random.shuffle(shuffled_ips)
        random.shuffle(shuffled_ports)
        self.assertEqual(
            allocate(before, shuffled_ips, shuffled_ports, subnet, 9080), result
        )
        again = allocate(result.allocations, wanted_ips, wanted_ports, subnet, 9080)
        self.assertEqual(again.allocations, result.allocations)


class EncodingTests(SynchronousTestCase):
    """
    The state files are byte for byte what the original wrote.
    """

    def test_ipMappings(self) -> None:
        """
        ip_mappings.json: keys sorted, two-space indent, no final newline.
        """
        self.assertEqual(
            encode_ips({"db.prod": ip("10.107.0.3"), "api.prod": ip("10.107.0.2")}),
            b'{\n  "api.prod": "10.107.0.2",\n  "db.prod": "10.107.0.3"\n}',
        )
        self.assertEqual(encode_ips({}), b"{}")

    def test_networkPorts(self) -> None:
        """
        network_ports.json is keyed hostname:port; not yet migrated entries
        keep the original's hostname keys.
        """
        self.assertEqual(
            encode_network_ports(
                {("a.ns", 80): 9080, ("a.ns", 5432): 9081}, {"b.ns": 9082}
            ),
            b'{\n  "a.ns:5432": 9081,\n  "a.ns:80": 9080,\n  "b.ns": 9082\n}',
        )

    def test_networkPortsBadEntries(self) -> None:
        """
        Entries with a bad port or key are dropped, each with a warning that
        names it; the good ones are kept.
        """
        ports, legacy, warnings = decode_network_ports(
            b'{"a.ns:80": 9080, "b.ns": 9081, "c.ns:80": true, "d.ns:80": 0,'
            b' "e.ns:80": 70000, "f.ns:x": 9090, ":80": 9091, "g.ns:80": "9092"}'
        )
        self.assertEqual(ports, {("a.ns", 80): 9080})
        self.assertEqual(legacy, {"b.ns": 9081})
        self.assertEqual(len(warnings), 6)
        for name in ("c.ns", "d.ns", "e.ns", "f.ns", "':80'", "g.ns"):
            self.assertTrue(any(name in warning for warning in warnings), name)


class PersistenceTests(SynchronousTestCase):
    """
    L{save} and L{load} keep allocations across restarts; damaged files are
    moved aside, never fatal.
    """

    def setUp(self) -> None:
        self.state_dir = self.mktemp()
        os.mkdir(self.state_dir)

    def path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    def write(self, name: str, data: bytes) -> None:
        with open(self.path(name), "wb") as f:
            f.write(data)

    def load(self, subnet=SUBNET) -> tuple[Allocations, list[str]]:
        with capturedLogs() as events:
            result = load(self.state_dir, subnet, now=lambda: NOW)
        return result, [formatEvent(event) for event in events]

    def test_roundTrip(self) -> None:
        """
        What is saved is loaded back, and the files are 0644.
        """
        allocations = Allocations(
            {"a.ns": ip("10.107.0.2")},
            {("a.ns", 80): 9080},
            {"b.ns": 9081},
            {"c.ns": (ip("10.107.0.3"), NOW)},
            {("c.ns", 80): (9082, NOW - 1.5)},
        )
        save(self.state_dir, allocations)
        loaded, messages = self.load()
        self.assertEqual((loaded, messages), (allocations, []))
        for name in (IP_MAPPINGS, NETWORK_PORTS, RELEASED):
            self.assertEqual(stat.S_IMODE(os.stat(self.path(name)).st_mode), 0o644)

    def test_roundTripIPv6(self) -> None:
        """
        The IPv6 addresses, and those held back, are saved and loaded back;
        they go to ip6_mappings.json, in the format of ip_mappings.json,
        which holds the IPv4 addresses alone, as the original wrote it.
        """
        allocations = Allocations(
            {"a.ns": ip("10.107.0.2")},
            released_ips6={"c.ns": (ip("fd6e:6772:6f6b::3"), NOW)},
            ips6={"a.ns": ip("fd6e:6772:6f6b::2")},
        )
        save(self.state_dir, allocations)
        with capturedLogs() as events:
            loaded = load(self.state_dir, SUBNET, now=lambda: NOW, subnet6=SUBNET6)
        self.assertEqual((loaded, list(events)), (allocations, []))
        with open(self.path(IP_MAPPINGS), "rb") as f:
            self.assertEqual(f.read(), b'{\n  "a.ns": "10.107.0.2"\n}')
        with open(self.path(IP6_MAPPINGS), "rb") as f:
            self.assertEqual(f.read(), b'{\n  "a.ns": "fd6e:6772:6f6b::2"\n}')
        self.assertEqual(stat.S_IMODE(os.stat(self.path(IP6_MAPPINGS)).st_mode), 0o644)
        self.assertEqual(self.load()[0], Allocations({"a.ns": ip("10.107.0.2")}))

    def test_ipv6OutsideSubnet6(self) -> None:
        """
        An IPv6 address outside net.subnet6 (the block changed) is dropped
        with a warning naming the key, and an old state directory without
        ip6_mappings.json loads as before.
        """
        self.write(IP_MAPPINGS, b'{\n  "a.ns": "10.107.0.2"\n}')
        with capturedLogs() as events:
            loaded = load(self.state_dir, SUBNET, now=lambda: NOW, subnet6=SUBNET6)
        self.assertEqual(
            (loaded, list(events)), (Allocations({"a.ns": ip("10.107.0.2")}), [])
        )
        self.write(IP6_MAPPINGS, b'{"a.ns": "fd00::2"}')
        with capturedLogs() as events:
            loaded = load(self.state_dir, SUBNET, now=lambda: NOW, subnet6=SUBNET6)
        self.assertEqual(loaded.ips6, {})
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                f"{self.path(IP6_MAPPINGS)}: ignoring a.ns: fd00::2 is outside"
                f" net.subnet6 {SUBNET6}"
            ],
        )

    def test_missingFiles(self) -> None:
        """
        Without state files nothing is allocated yet, and nothing is said.
        """
        self.assertEqual(self.load(), (Allocations(), []))

    def test_originalFiles(self) -> None:
        """
        The original's files are read, including its hostname-keyed ports.
        """
        self.write(IP_MAPPINGS, b'{\n  "api.prod": "10.107.0.2"\n}')
        self.write(NETWORK_PORTS, b'{\n  "api.prod": 9080\n}')
        loaded, messages = self.load()
        self.assertEqual(
            loaded,
            Allocations({"api.prod": ip("10.107.0.2")}, {}, {"api.prod": 9080}),
        )
        self.assertEqual(messages, [])

    def test_corruptFilesMovedAside(self) -> None:
        """
        A file that is not a JSON object (garbage, null, a list, bad UTF-8)
        is renamed to <name>.corrupt-<UTC time> with its content intact,
        with a warning naming both; it counts as empty.
        """
        for content in (b"{not json", b"null", b'["a"]', b'{"\xff": 1}'):
            self.write(IP_MAPPINGS, content)
            self.write(NETWORK_PORTS, b'{"a.ns:80": 9080}')
            loaded, messages = self.load()
            self.assertEqual(loaded, Allocations({}, {("a.ns", 80): 9080}))
            aside = self.path(IP_MAPPINGS + ".corrupt-20240506T070809Z")
            with open(aside, "rb") as f:
                self.assertEqual(f.read(), content)
            self.assertFalse(os.path.exists(self.path(IP_MAPPINGS)))
            self.assertEqual(len(messages), 1)
            self.assertIn(self.path(IP_MAPPINGS), messages[0])
            self.assertIn(aside, messages[0])
            os.unlink(aside)

    def test_corruptAsideNameTaken(self) -> None:
        """
        A second corrupt file in the same second does not overwrite the
        first one moved aside.
        """
        self.write(NETWORK_PORTS, b"1")
        self.load()
        self.write(NETWORK_PORTS, b"2")
        self.load()
        aside = self.path(NETWORK_PORTS + ".corrupt-20240506T070809Z")
        with open(aside, "rb") as f, open(aside + "-1", "rb") as g:
            self.assertEqual((f.read(), g.read()), (b"1", b"2"))

    def test_unreadableMovedAside(self) -> None:
        """
        A state file that cannot be read (here: a directory) is moved aside
        too.
        """
        os.mkdir(self.path(NETWORK_PORTS))
        loaded, messages = self.load()
        self.assertEqual(loaded, Allocations())
        self.assertTrue(
            os.path.isdir(self.path(NETWORK_PORTS + ".corrupt-20240506T070809Z"))
        )
        self.assertIn("cannot be read", messages[0])

    def test_entriesDropped(self) -> None:
        """
        Entries outside the configured subnet, reserved addresses, non-
        addresses, and a second hostname on one address are dropped, each
        with a warning naming the hostname; the rest is kept.
        """
        self.write(
            IP_MAPPINGS,
            b'{"a.ns": "10.107.0.2", "b.ns": "192.168.1.2", "c.ns": "10.107.0.1",'
            b' "d.ns": "banana", "e.ns": 7, "f.ns": "10.107.0.2"}',
        )
        loaded, messages = self.load()
        self.assertEqual(loaded.ips, {"a.ns": ip("10.107.0.2")})
        self.assertEqual(len(messages), 5)
        for name, detail in [
            ("b.ns", "outside net.subnet 10.107.0.0/16"),
            ("c.ns", "reserved"),
            ("d.ns", "'banana'"),
            ("e.ns", "7"),
            ("f.ns", "a.ns"),
        ]:
            self.assertTrue(
                any(name in m and detail in m for m in messages), (name, messages)
            )
        self.assertTrue(os.path.exists(self.path(IP_MAPPINGS)))
