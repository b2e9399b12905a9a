"""
The DNS benchmark: what answering a name costs ngrokd's DNS server, beside
dnsmasq serving the same names.

    python bench/dns.py [--names 10000] [--queries 20000] [--latency 2000]
        [--window 64] [--answer-cache N] [--json FILE] [--keep]
    python bench/dns.py --flood [--flood-rate 20000] [--flood-sources 16]
        [--connections 300] [--json FILE] [--keep]

One run starts, on 127.0.0.1 only and each in a process of its own: an
upstream dnsmasq serving the forwarded names, dnsmasq serving the same
C{--names} names from a hosts file and forwarding to that upstream (the C
baseline), and ngrokd's DNS server (C{bench/_dnsd.py}) with the same names
and upstream. For each server it measures three kinds of query: a known
name (A), a known name's AAAA (NODATA: the names have IPv4 only) and a name
only the upstream knows (forwarded); and the upstream asked directly, for
what forwarding adds. Each kind starts with a warm-up pass over its
queries (ngrokd keeps its answers until its table changes). Latency:
C{--latency} queries one at a time, p50 and p99. Throughput: C{--queries}
queries with C{--window} outstanding, answers a second. The servers,
the upstream among them, run on CPU 1 and the client on CPU 0, when there
are two.

With C{--flood} it measures instead whether a flooded DNS server slows
ngrokd's data path (L{flood_main}): a running ngrokd, its DNS server on,
carrying new connections while a sender floods that server.

This is not a test: it asserts nothing about speed. It fails (exit status 1)
only when an answer is wrong or a server does not start.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from attrs import asdict, frozen
from datapath import (
    ECHO,
    BenchError,
    Child,
    Children,
    Latency,
    Settings,
    free_ports,
    measure_latency,
    metric_samples,
    start_backends,
    start_daemon,
    start_devcloud,
    wait_until,
    write_daemon_config,
)
from twisted.names import dns

LOOPBACK = "127.0.0.1"
#: Seconds to wait for a server to answer its first query.
START_TIMEOUT = 30.0
#: Seconds without an answer after which the outstanding queries count as lost.
LOSS_TIMEOUT = 2.0
#: Names only the upstream knows.
FORWARDED_NAMES = 1000
#: The zone of the benchmark's own names (not a public top-level domain).
ZONE = "bench"
#: (kind, query type, expected rcode, expected answer count at least)
KINDS = {
    "known": (dns.A, dns.OK, 1),
    "nodata": (dns.AAAA, dns.OK, 0),
    "forwarded": (dns.A, dns.OK, 1),
}


class WrongAnswer(BenchError):
    """
    A server answered with another code, or fewer records, than expected.
    """


def names(count: int) -> list[tuple[str, str]]:
    """
    C{count} (address, name) pairs in the benchmark's zone: 100 namespaces.
    """
    return [
        (
            f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}",
            f"svc{i}.ns{i % 100}.{ZONE}",
        )
        for i in range(count)
    ]


def forwarded_names() -> list[tuple[str, str]]:
    return [
        (f"192.0.2.{i % 250 + 1}", f"f{i}.upstream.test")
        for i in range(FORWARDED_NAMES)
    ]


def write_hosts(path: Path, entries: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{address} {name}\n" for address, name in entries))
    path.chmod(0o644)  # dnsmasq reads it after giving up root
    return path


def query_bytes(name: str, qtype: int) -> bytes:
    message = dns.Message(id=0, recDes=1)
    message.queries = [dns.Query(name, qtype, dns.IN)]
    return message.toStr()


def dnsmasq(
    children: Children, name: str, port: int, hosts: Path, *extra: str
) -> Child:
    binary = shutil.which("dnsmasq")
    assert binary is not None
    return children.spawn(
        name,
        [
            binary,
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={hosts}",
            f"--port={port}",
            f"--listen-address={LOOPBACK}",
            "--bind-interfaces",
            "--pid-file=",
            *extra,
        ],
    )


def pin(child: Child, cpu: int) -> None:
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(child.pid, {cpu})


def answers(port: int, query: bytes) -> bool | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(query, (LOOPBACK, port))
        try:
            sock.recv(4096)
        except OSError:
            return None
    return True


@frozen
class Result:
    """
    One kind of query against one server.
    """

    p50_us: float
    p99_us: float
    qps: float
    lost: int


def _check(data: bytes, kind: str) -> None:
    _, rcode, at_least = KINDS[kind]
    got = data[3] & 0xF
    count = int.from_bytes(data[6:8], "big")
    if got != rcode or count < at_least:
        raise WrongAnswer(
            f"{kind}: rcode {got} with {count} answers, not {rcode} with {at_least}+"
        )


def run_queries(
    port: int, queries: Sequence[bytes], count: int, window: int, kind: str
) -> tuple[list[float], float, int]:
    """
    Send C{count} of C{queries} (cycled) with C{window} outstanding: each
    answer's latency in seconds, the elapsed seconds and the queries lost.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.connect((LOOPBACK, port))
    sock.settimeout(LOSS_TIMEOUT)
    outstanding: dict[int, float] = {}
    latencies: list[float] = []
    sent = lost = 0
    ident = random.randrange(65536)
    clock = time.perf_counter
    start = clock()
    with sock:
        while len(latencies) + lost < count:
            while len(outstanding) < window and sent < count:
                ident = (ident + 1) % 65536
                query = queries[sent % len(queries)]
                outstanding[ident] = clock()
                sock.send(ident.to_bytes(2, "big") + query[2:])
                sent += 1
            try:
                data = sock.recv(4096)
            except TimeoutError:
                lost += len(outstanding)
                outstanding.clear()
                continue
            asked = outstanding.pop(int.from_bytes(data[:2], "big"), None)
            if asked is None:
                continue  # an answer after its query counted as lost
            latencies.append(clock() - asked)
            _check(data, kind)
    return latencies, clock() - start, lost


def measure(
    port: int, queries: Sequence[bytes], kind: str, settings: argparse.Namespace
) -> Result:
    # A warm-up pass over every query first: what a server keeps of earlier
    # answers is kept from here on.
    run_queries(port, queries, len(queries), settings.window, kind)
    latencies, _, lost_one = run_queries(port, queries, settings.latency, 1, kind)
    count = settings.queries if kind != "forwarded" else settings.queries // 4
    done, elapsed, lost = run_queries(port, queries, count, settings.window, kind)
    cuts = statistics.quantiles(latencies, n=100)
    return Result(
        p50_us=statistics.median(latencies) * 1e6,
        p99_us=cuts[98] * 1e6,
        qps=len(done) / elapsed,
        lost=lost + lost_one,
    )


def finish(children: Children, workdir: Path, keep: bool) -> None:
    """
    Stop every process started; remove the working directory unless
    C{keep}.
    """
    children.stop_all()
    if keep:
        print(f"dns: kept {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def progress(message: str) -> None:
    print(f"dns: {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--names", type=int, default=10000)
    parser.add_argument(
        "--queries", type=int, default=20000, help="per kind (forwarded: a quarter)"
    )
    parser.add_argument(
        "--latency", type=int, default=2000, help="queries one at a time, per kind"
    )
    parser.add_argument("--window", type=int, default=64, help="outstanding queries")
    parser.add_argument(
        "--answer-cache", type=int, default=None, help="ngrokd's cached answers"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--keep", action="store_true", help="keep the working directory"
    )
    parser.add_argument(
        "--flood",
        action="store_true",
        help="measure ngrokd's new connections with its DNS server flooded",
    )
    parser.add_argument(
        "--flood-rate", type=float, default=20000.0, help="queries a second"
    )
    parser.add_argument(
        "--flood-sources", type=int, default=16, help="source addresses (1-250)"
    )
    parser.add_argument(
        "--connections", type=int, default=300, help="sequential, per phase"
    )
    return parser.parse_args(argv)


def table(results: dict[str, dict[str, Result]]) -> str:
    lines = [f"{'':22} {'p50 us':>9} {'p99 us':>9} {'answers/s':>10} {'lost':>5}"]
    for server, kinds in results.items():
        for kind, r in kinds.items():
            lines.append(
                f"{server + ' ' + kind:22} {r.p50_us:9.0f} {r.p99_us:9.0f}"
                f" {r.qps:10.0f} {r.lost:5d}"
            )
    return "\n".join(lines)


def targets(results: dict[str, dict[str, Result]]) -> list[dict[str, object]]:
    ours, theirs = results["ngrokd"], results["dnsmasq"]
    direct = results["upstream"]["forwarded"]
    found = [
        (
            "known p50 / dnsmasq's",
            ours["known"].p50_us / theirs["known"].p50_us,
            1.5,
            "<=",
        ),
        (
            "nodata p50 / dnsmasq's",
            ours["nodata"].p50_us / theirs["nodata"].p50_us,
            1.5,
            "<=",
        ),
        ("known answers a second", ours["known"].qps, 10000.0, ">="),
        (
            "forwarding adds (p50, ms)",
            (ours["forwarded"].p50_us - direct.p50_us) / 1000,
            1.0,
            "<=",
        ),
    ]
    return [
        {
            "what": what,
            "value": value,
            "bound": bound,
            "compare": compare,
            "met": value <= bound if compare == "<=" else value >= bound,
        }
        for what, value, bound, compare in found
    ]


# The flood: does a flooded DNS server slow ngrokd's data path?

#: Seconds the flood runs before the flooded phase is measured.
FLOOD_SETTLE = 2.0
#: Seconds the flood may last at most, whatever happens to the benchmark.
FLOOD_LIMIT = 600.0
#: The most the flooded p99 may be above the quiet one: a run's noise.
FLOOD_BOUND = 1.2


def dns_counts(health_address: str) -> dict[str, int]:
    """
    ngrokd's DNS counters now (C{ngrokd_dns_*}, by label), from C{/metrics}.
    """
    counts = {}
    for sample in metric_samples(health_address):
        if sample.name.startswith("ngrokd_dns_") and sample.name.endswith("_total"):
            label = ",".join(sample.labels.values())
            name = sample.name.removeprefix("ngrokd_dns_").removesuffix("_total")
            counts[f"{name}{'[' + label + ']' if label else ''}"] = int(sample.value)
    if not counts:
        raise BenchError(
            f"{health_address}/metrics has no ngrokd_dns_ counters: is the server on?"
        )
    return counts


def flooded_config(path: Path, listen: tuple[str, int], upstream: int) -> None:
    """
    Turn on ngrokd's DNS server in C{path} (network mode: only C{dns.listen}
    starts it), forwarding to the upstream on C{upstream}, with the system
    left to the hosts file (C{dns.mode: hosts}, which changes nothing in
    network mode).
    """
    config = yaml.safe_load(path.read_text())
    config["dns"] = {
        "mode": "hosts",
        "listen": f"{listen[0]}:{listen[1]}",
        "upstreams": [f"{LOOPBACK}:{upstream}"],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def latency_row(name: str, latency: Latency) -> str:
    return (
        f"{name:22} {latency.p50_ms:8.2f} {latency.p90_ms:8.2f}"
        f" {latency.p99_ms:8.2f} {latency.max_ms:8.2f}"
    )


def flood_main(settings: argparse.Namespace, argv: Sequence[str]) -> int:
    """
    Start the backends, the devcloud, an upstream dnsmasq and ngrokd in
    network mode with its DNS server on 127.0.0.1 (forwarding every name to
    that upstream: network mode serves no name of its own); measure
    C{--connections} sequential new connections through ngrokd (connect,
    one byte echoed), quiet, then while C{bench/_flood.py} sends
    C{--flood-rate} queries a second to the server from
    C{--flood-sources} addresses, then quiet again; say what the flood got
    (the sender's count of answers by rcode, ngrokd's DNS counters).
    """
    if shutil.which("dnsmasq") is None:
        print("dns: dnsmasq is not installed (apt-get install dnsmasq-base)")
        return 2
    if not 1 <= settings.flood_sources <= 250:
        print("dns: --flood-sources takes 1 to 250", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="ngrokd-bench-dns-flood-"))
    workdir.chmod(0o755)
    children = Children(workdir)
    failed = False
    load_start = os.getloadavg()
    try:
        upstream_hosts = write_hosts(workdir / "upstream.hosts", forwarded_names())
        upstream_port, dns_port = free_ports(2)
        upstream = dnsmasq(
            children, "upstream", upstream_port, upstream_hosts, "--cache-size=0"
        )
        wait_until(
            functools.partial(
                answers, upstream_port, query_bytes("f0.upstream.test", dns.A)
            ),
            START_TIMEOUT,
            "the upstream",
            [upstream],
        )
        progress("starting the backends, the devcloud and ngrokd")
        _, backends = start_backends(children, workdir)
        devcloud = start_devcloud(children, workdir, backends)
        config = write_daemon_config(
            workdir,
            devcloud,
            devcloud.ingress_port,
            Settings(
                latency_connections=settings.connections,
                bulk_bytes=0,
                parallel_connections=0,
                parallel_bytes_each=0,
                concurrency=0,
                direct_only=False,
                settle_seconds=0.0,
                delay_ms=0.0,
                early_data=True,
                pool_linger=300.0,
            ),
        )
        flooded_config(config, (LOOPBACK, dns_port), upstream_port)
        daemon = start_daemon(children, devcloud, config)
        pin(daemon.child, 1)
        probe = query_bytes("f0.upstream.test", dns.A)
        wait_until(
            functools.partial(answers, dns_port, probe),
            START_TIMEOUT,
            "ngrokd's DNS server",
            [daemon.child],
        )
        echo = daemon.address(ECHO)
        progress(f"quiet: {settings.connections} new connections")
        before = measure_latency(echo, settings.connections)
        queries = workdir / "queries.txt"
        queries.write_text(
            "".join(query_bytes(n, dns.A).hex() + "\n" for _, n in forwarded_names())
        )
        counted = dns_counts(daemon.health_address)
        result = workdir / "flood.json"
        sender = children.spawn(
            "flood",
            [
                sys.executable,
                str(Path(__file__).with_name("_flood.py")),
                str(dns_port),
                str(settings.flood_rate),
                str(settings.flood_sources),
                str(FLOOD_LIMIT),
                str(queries),
                str(result),
            ],
        )
        pin(sender, 0)
        time.sleep(FLOOD_SETTLE)
        sender.check()
        progress(
            f"flooded: {settings.connections} new connections under"
            f" {settings.flood_rate:.0f} queries a second"
        )
        flooded = measure_latency(echo, settings.connections)
        sender.check()
        sender.process.send_signal(signal.SIGTERM)
        sender.process.wait(START_TIMEOUT)
        flood = json.loads(result.read_text())
        during = {
            key: value - counted.get(key, 0)
            for key, value in dns_counts(daemon.health_address).items()
        }
        progress(f"quiet again: {settings.connections} new connections")
        after = measure_latency(echo, settings.connections)
        daemon.child.check()
        load_end = os.getloadavg()

        answered = sum(flood["answers"].values())
        quiet_p99 = max(before.p99_ms, after.p99_ms)
        ratio = flooded.p99_ms / quiet_p99
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs,"
            f" Python {platform.python_version()}; load average (1, 5, 15 min)"
            f" {' '.join(f'{x:.2f}' for x in load_start)} at the start,"
            f" {' '.join(f'{x:.2f}' for x in load_end)} at the end"
        )
        print(f"command: python bench/dns.py {' '.join(argv)}".rstrip())
        print(
            f"new connection through ngrokd, connect + 1-byte echo,"
            f" {settings.connections} sequential:"
        )
        print(f"{'':22} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        print(latency_row("quiet, before", before))
        print(latency_row("DNS server flooded", flooded))
        print(latency_row("quiet, after", after))
        print(
            f"flood: {flood['sent']} queries in {flood['seconds']:.1f} s"
            f" ({flood['sent'] / flood['seconds']:.0f}/s) from"
            f" {flood['sources']} addresses"
            f" ({settings.flood_rate / flood['sources']:.0f}/s each), names"
            f" ngrokd forwards; answered {answered}"
            f" ({', '.join(f'{k} {v}' for k, v in sorted(flood['answers'].items()))}),"
            f" unanswered {flood['sent'] - answered}"
        )
        print(
            "ngrokd's DNS counters over the flood: "
            + ", ".join(f"{k} {v}" for k, v in sorted(during.items()) if v)
        )
        print(
            f"target: flooded p99 / quiet p99: {ratio:.2f}"
            f" ({'met' if ratio <= FLOOD_BOUND else 'missed'}; <= {FLOOD_BOUND:g})"
        )
        if settings.json:
            settings.json.write_text(
                json.dumps(
                    {
                        "latency": {
                            "quiet_before": asdict(before),
                            "flooded": asdict(flooded),
                            "quiet_after": asdict(after),
                        },
                        "flood": flood,
                        "ngrokd_dns_counters": during,
                        "load_average": {"start": load_start, "end": load_end},
                        "target": {
                            "flooded_p99_over_quiet": ratio,
                            "bound": FLOOD_BOUND,
                            "met": ratio <= FLOOD_BOUND,
                        },
                        "settings": {k: str(v) for k, v in vars(settings).items()},
                    },
                    indent=2,
                )
            )
    except (BenchError, OSError, subprocess.TimeoutExpired) as e:
        failed = True
        print(f"dns: {e}", file=sys.stderr)
    finally:
        finish(children, workdir, settings.keep or failed)
    return 1 if failed else 0


def main(argv: Sequence[str]) -> int:
    settings = parse_args(argv)
    if settings.flood:
        return flood_main(settings, argv)
    if shutil.which("dnsmasq") is None:
        print(
            "dns: dnsmasq is not installed (apt-get install dnsmasq-base)",
            file=sys.stderr,
        )
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="ngrokd-bench-dns-"))
    workdir.chmod(0o755)
    children = Children(workdir)
    failed = False
    try:
        ours = names(settings.names)
        hosts = write_hosts(workdir / "names.hosts", ours)
        upstream_hosts = write_hosts(workdir / "upstream.hosts", forwarded_names())
        upstream_port, dnsmasq_port, ngrokd_port = free_ports(3)
        upstream = dnsmasq(
            children, "upstream", upstream_port, upstream_hosts, "--cache-size=0"
        )
        baseline = dnsmasq(
            children,
            "dnsmasq",
            dnsmasq_port,
            hosts,
            f"--server={LOOPBACK}#{upstream_port}",
            f"--local=/{ZONE}/",
            "--cache-size=0",
        )
        server = [
            sys.executable,
            str(Path(__file__).with_name("_dnsd.py")),
            str(ngrokd_port),
            str(upstream_port),
            str(hosts),
        ]
        if settings.answer_cache is not None:
            server.append(str(settings.answer_cache))
        daemon = children.spawn("ngrokd", server)
        pin(upstream, 1)
        pin(baseline, 1)
        pin(daemon, 1)
        if (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(0, {0})
        probe = query_bytes(f"svc0.ns0.{ZONE}", dns.A)
        for child, port in (
            (upstream, upstream_port),
            (baseline, dnsmasq_port),
            (daemon, ngrokd_port),
        ):
            ready = functools.partial(answers, port, probe)
            wait_until(ready, START_TIMEOUT, child.name, [child])

        shuffled = [name for _, name in ours]
        random.Random(1).shuffle(shuffled)
        queries = {
            "known": [query_bytes(n, dns.A) for n in shuffled],
            "nodata": [query_bytes(n, dns.AAAA) for n in shuffled],
            "forwarded": [query_bytes(n, dns.A) for _, n in forwarded_names()],
        }
        results: dict[str, dict[str, Result]] = {
            "ngrokd": {},
            "dnsmasq": {},
            "upstream": {},
        }
        for server_name, port in (("dnsmasq", dnsmasq_port), ("ngrokd", ngrokd_port)):
            for kind, built in queries.items():
                progress(f"{server_name}: {kind}")
                results[server_name][kind] = measure(port, built, kind, settings)
        progress("upstream directly: forwarded")
        results["upstream"]["forwarded"] = measure(
            upstream_port, queries["forwarded"], "forwarded", settings
        )
        for child in (upstream, baseline, daemon):
            child.check()

        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs,"
            f" Python {platform.python_version()}"
        )
        version = subprocess.run(
            [shutil.which("dnsmasq") or "dnsmasq", "--version"],
            capture_output=True,
            text=True,
        ).stdout
        print(f"dnsmasq: {version.splitlines()[0] if version else 'unknown'}")
        print(f"command: python bench/dns.py {' '.join(argv)}".rstrip())
        print(table(results))
        found = targets(results)
        for target in found:
            print(
                f"target: {target['what']}: {target['value']:.2f}"
                f" ({'met' if target['met'] else 'missed'};"
                f" {target['compare']} {target['bound']:g})"
            )
        if settings.json:
            settings.json.write_text(
                json.dumps(
                    {
                        "results": {
                            s: {k: asdict(r) for k, r in kinds.items()}
                            for s, kinds in results.items()
                        },
                        "targets": found,
                        "settings": {k: str(v) for k, v in vars(settings).items()},
                    },
                    indent=2,
                )
            )
    except BenchError as e:
        failed = True
        print(f"dns: {e}", file=sys.stderr)
    finally:
        finish(children, workdir, settings.keep or failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
