"""
The burst alone: what opening many connections at once through ngrokd costs
in memory, and whether it is given back.

    python bench/burst.py [--concurrency 5000] [--settle 60] [--no-stunnel]

The same pieces as C{bench/datapath.py} (whose code this uses), without its
latency and bulk phases: the backends, the devcloud, the stunnel pair (unless
C{--no-stunnel}, or without stunnel) and ngrokd. It reads ngrokd's RSS idle,
runs the C{--concurrency} phase through the pair and then through ngrokd
(the highest RSS of each during its phase), and reads ngrokd's RSS every
10 s for C{--settle} seconds after it. A burst and a settle take about a
minute and a half, where the whole data-path run takes several.

Not a test: it fails (exit status 1) only when a connection fails.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import datapath as dp
from _proc import PeakRss, status_kib
from _stunnel import find_stunnel

#: Seconds between readings of ngrokd's RSS while it settles.
SETTLE_STEP = 10.0


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB ({kib * 1024 / 1e6:.1f} MB)"


def burst(name: str, address: dp.Address, pid: int, connections: int) -> dp.Concurrency:
    """
    C{connections} at once to C{address}; say how long they took and the
    highest RSS of C{pid} meanwhile.
    """
    dp.progress(f"{name}: {connections} connections at once")
    with PeakRss({name: pid}) as rss:
        result = dp.measure_concurrency(address, connections)
    print(
        f"{name}: all echoed in {result.wall_seconds:.2f} s (median"
        f" {result.p50_seconds:.2f} s), {result.failed} failed, highest RSS"
        f" {_mib(rss.peaks_kib[name])}",
        flush=True,
    )
    return result


def run(args: argparse.Namespace, children: dp.Children, workdir: Path) -> bool:
    dp.raise_fd_limit()
    settings = dp.Settings(
        latency_connections=0,
        bulk_bytes=0,
        parallel_connections=0,
        parallel_bytes_each=0,
        concurrency=args.concurrency,
        direct_only=False,
        settle_seconds=args.settle,
        delay_ms=0.0,
        early_data=True,
        pool_linger=max(dp.MIN_LINGER, args.settle * dp.LINGER_OF_SETTLE),
    )
    _, backends = dp.start_backends(children, workdir)
    devcloud = dp.start_devcloud(children, workdir, backends)
    stunnel = None if args.no_stunnel else find_stunnel()
    results = []
    if stunnel is not None:
        pair = dp.start_stunnel(
            children, workdir, dp.stunnel_services(backends), stunnel
        )
        pair_burst = burst(
            "stunnel client", pair.address(dp.ECHO), pair.client.pid, args.concurrency
        )
        results.append(pair_burst)
    config = dp.write_daemon_config(workdir, devcloud, devcloud.ingress_port, settings)
    daemon = dp.start_daemon(children, devcloud, config)
    pid = daemon.child.pid
    time.sleep(dp.IDLE_PAUSE)
    idle = status_kib(pid, "VmRSS")
    print(f"ngrokd: idle {_mib(idle)}", flush=True)
    through = burst("ngrokd", daemon.address(dp.ECHO), pid, args.concurrency)
    results.append(through)
    if stunnel is not None:
        ratio = through.wall_seconds / pair_burst.wall_seconds
        print(f"ngrokd/stunnel, all echoed: {ratio:.2f}", flush=True)
    started = time.monotonic()
    while (waited := time.monotonic() - started) < args.settle:
        time.sleep(min(SETTLE_STEP, args.settle - waited))
        rss = status_kib(pid, "VmRSS")
        print(
            f"ngrokd: {time.monotonic() - started:.0f} s after, {_mib(rss)},"
            f" {rss / idle:.2f} x idle",
            flush=True,
        )
    return not any(result.failed for result in results)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="burst.py", description="ngrokd's memory through a burst, on 127.0.0.1."
    )
    parser.add_argument("--concurrency", type=dp._positive, default=5000)
    parser.add_argument("--settle", type=dp._seconds, default=60.0)
    parser.add_argument("--no-stunnel", action="store_true")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ngrokd-burst-"))
    children = dp.Children(workdir)
    try:
        try:
            good = run(args, children, workdir)
        finally:
            children.stop_all()
    except dp.BenchError as e:
        print(f"burst: FAILED: {e}", file=sys.stderr)
        good = False
    if good:
        shutil.rmtree(workdir)
    else:
        dp.progress(f"logs kept in {workdir}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
