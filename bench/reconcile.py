"""
The reconcile benchmark: what discovering and serving many endpoints costs.

    python bench/reconcile.py [--endpoints 10000] [--polls 5] [--json FILE]
                              [--profile FILE]

One process runs the devcloud (API over HTTPS, on 127.0.0.1) with
C{--endpoints} bound endpoints, half C{http://svcN.nsM}, half
C{tcp://dbN.nsM:5432}, listed 100 per page, and the real daemon in network
mode on 127.0.0.1 with ports from 20000 up (so 10,000 listeners fit below
65535). The daemon registers first (not measured), then is restarted with
that identity, and it measures:

  - cold: from the daemon's start to every endpoint listening (load the
    identity, ask ngrok for the operator, walk every page, parse, plan,
    allocate and save, bind every listener);
  - unchanged poll: C{--polls} polls that find nothing new, each from its
    start to the end of its reconcile;
  - and apart, for profiling: the page walk alone, and a reconcile of the
    same endpoints alone;
  - one C{/metrics} scrape and one C{/status} document of every endpoint,
    all their pieces at once (the health server writes them in slices
    between the reactor's turns);

each with its wall time, and the process's peak RSS (C{ru_maxrss}) at the
end, which includes the devcloud. The soft limit on open files is raised to
the hard limit (each listener is a file descriptor). With C{--profile} the
whole run is profiled with cProfile into FILE (read it with C{python -m
pstats FILE}). It prints a table and, with C{--json}, writes every number.

This is not a test: it asserts nothing about speed. It fails (exit status 1)
only when endpoints do not all listen, or something fails. Linux or macOS.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from attrs import frozen
from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater, react
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from ngrokd.config import load_config
from ngrokd.control.client import connect
from ngrokd.control.feed import EventFeed
from ngrokd.control.health import status_json
from ngrokd.control.metrics import DaemonMetrics
from ngrokd.control.server import ControlService
from ngrokd.daemon import Daemon
from ngrokd.devcloud.tap import RunningDevcloud, start_devcloud

START_PORT = 20000
PAGE_SIZE = 100
#: Bounds on the waits, in seconds.
REGISTER_TIMEOUT = 60.0
COLD_TIMEOUT = 300.0
POLL_TIMEOUT = 120.0
#: How often a wait looks at the daemon, in seconds.
TICK = 0.002
MiB = 1024 * 1024


class BenchError(Exception):
    """
    The benchmark could not run to the end; the message says why.
    """


@frozen
class Report:
    """
    Every number of one run; times in seconds, memory in bytes.
    """

    endpoints: int
    listening: int
    cold: float
    unchanged: tuple[float, ...]
    page_walk: float
    reconcile_alone: float
    metrics_scrape: float
    metrics_bytes: int
    status_render: float
    ctl_list: float
    ctl_rows: int
    rss_before_daemon: int
    peak_rss: int
    machine: str


def _raise_file_limit(needed: int) -> int:
    """
    Raise the soft limit on open files to the hard limit; the new limit.

    @raise BenchError: the hard limit is below C{needed}.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(
            f"{needed} file descriptors are needed, the hard limit is {hard}"
            " (raise it with ulimit -Hn as root, or use fewer --endpoints)"
        )
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _rss_now() -> int:
    """
    The resident set size now (Linux), or the peak where /proc is absent.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _peak_rss()


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Kilobytes on Linux, bytes on macOS.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def endpoint_urls(count: int) -> list[str]:
    """
    C{count} distinct endpoint URLs, half HTTP, half TCP, over 50
    namespaces.
    """
    return [
        f"http://svc{n}.ns{n % 50}" if n % 2 else f"tcp://db{n}.ns{n % 50}:5432"
        for n in range(count)
    ]


async def _wait(condition: Callable[[], bool], what: str, timeout: float) -> float:
    """
    Wait for C{condition}; when it became true (the clock's time).
    """
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        await deferLater(reactor, TICK, lambda: None)
    return time.perf_counter()


def _listening(daemon: Daemon) -> int:
    return sum(x.listening for x in daemon.listeners.listeners.values())


def _settled(daemon: Daemon, since: float | None) -> Callable[[], bool]:
    """
    True once a poll newer than C{since} succeeded and was applied.
    """

    def settled() -> bool:
        discovery = daemon.discovery
        last = discovery.last_success
        return last is not None and last != since and not discovery.polling

    return settled


async def run(args: argparse.Namespace, workdir: str) -> Report:
    devcloud: RunningDevcloud = start_devcloud(
        reactor, os.path.join(workdir, "devcloud"), start_port=START_PORT
    )
    try:
        devcloud.cloud.page_size = PAGE_SIZE
        for url in endpoint_urls(args.endpoints):
            devcloud.cloud.add_endpoint(url, ("127.0.0.1", 9))
        loaded = load_config(devcloud.config_path, environ={}).config
        config = attrs.evolve(
            loaded,
            bound_endpoints=attrs.evolve(loaded.bound_endpoints, poll_interval=3600),
        )
        progress("registering")
        first = Daemon(config, reactor)
        first.startService()
        await _wait(lambda: first.registered, "registration", REGISTER_TIMEOUT)
        await first.stopService()
        # A registered daemon that has not served yet: a cold start.
        for name in ("ip_mappings.json", "network_ports.json"):
            path = os.path.join(config.server.state_dir, name)
            if os.path.exists(path):
                os.unlink(path)
        rss_before = _rss_now()

        progress(f"cold start with {args.endpoints} endpoints")
        daemon = Daemon(config, reactor)
        started = time.perf_counter()
        daemon.startService()
        try:
            done = await _wait(_settled(daemon, None), "the first poll", COLD_TIMEOUT)
            cold = done - started
            listening = _listening(daemon)
            unchanged = []
            for n in range(args.polls):
                progress(f"unchanged poll {n + 1}/{args.polls}")
                since = daemon.discovery.last_success
                started = time.perf_counter()
                daemon.discovery.poll_now()
                done = await _wait(_settled(daemon, since), "a poll", POLL_TIMEOUT)
                unchanged.append(done - started)
            progress("page walk and reconcile apart")
            assert daemon.identity is not None
            started = time.perf_counter()
            found = await daemon.api.bound_endpoints(daemon.identity.operator_id)
            page_walk = time.perf_counter() - started
            started = time.perf_counter()
            await daemon.reconcile(found)
            reconcile_alone = time.perf_counter() - started
            progress("a /metrics scrape and a /status document")
            metrics = DaemonMetrics(daemon)
            started = time.perf_counter()
            metrics_bytes = len(generate_latest(metrics.registry)) + sum(
                len(piece) for piece in metrics.endpoint_series()
            )
            metrics_scrape = time.perf_counter() - started
            started = time.perf_counter()
            status_json(daemon)
            status_render = time.perf_counter() - started
            progress("ngrokctl list over the control socket")
            ctl_list, ctl_rows = await _list_over_socket(daemon)
        finally:
            await daemon.stopService()
    finally:
        await devcloud.stop()
    return Report(
        endpoints=args.endpoints,
        listening=listening,
        cold=cold,
        unchanged=tuple(unchanged),
        page_walk=page_walk,
        reconcile_alone=reconcile_alone,
        metrics_scrape=metrics_scrape,
        metrics_bytes=metrics_bytes,
        status_render=status_render,
        ctl_list=ctl_list,
        ctl_rows=ctl_rows,
        rss_before_daemon=rss_before,
        peak_rss=_peak_rss(),
        machine=f"{platform.machine()} {os.cpu_count()} CPUs,"
        f" {platform.python_implementation()} {platform.python_version()}",
    )


async def _list_over_socket(daemon: Daemon) -> tuple[float, int]:
    """
    How long C{ngrokctl list} takes to fetch every row over the real control
    socket and AMP, and how many rows came.
    """
    feed = EventFeed(daemon.daemon_status, daemon.board, reactor)
    control = ControlService(daemon, feed, reactor)
    control.startService()
    try:
        await control.whenListening()
        client = await connect(reactor, daemon.config.server.socket_path)
        try:
            started = time.perf_counter()
            rows = [row async for row in client.endpoints()]
            return time.perf_counter() - started, len(rows)
        finally:
            client.close()
    finally:
        await control.stopService()


def table(report: Report) -> str:
    """
    The report as a table a person reads.
    """
    unchanged = report.unchanged
    rows = [
        ("endpoints (listening)", f"{report.endpoints} ({report.listening})"),
        ("cold: start to all listening", f"{report.cold:.2f} s"),
        (
            f"unchanged poll, median of {len(unchanged)}",
            f"{statistics.median(unchanged):.3f} s" if unchanged else "-",
        ),
        ("unchanged poll, slowest", f"{max(unchanged):.3f} s" if unchanged else "-"),
        ("  of which: page walk alone", f"{report.page_walk:.3f} s"),
        ("  of which: reconcile alone", f"{report.reconcile_alone:.3f} s"),
        (
            "/metrics scrape",
            f"{report.metrics_scrape:.3f} s, {report.metrics_bytes / MiB:.1f} MiB",
        ),
        ("/status document", f"{report.status_render:.3f} s"),
        (
            "ngrokctl list, every page over the socket",
            f"{report.ctl_list:.3f} s, {report.ctl_rows} rows",
        ),
        (
            "RSS before the daemon (devcloud)",
            f"{report.rss_before_daemon / MiB:.0f} MiB",
        ),
        ("peak RSS (daemon + devcloud)", f"{report.peak_rss / MiB:.0f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join([*lines, f"machine: {report.machine}"])


def as_json(report: Report) -> dict[str, Any]:
    return attrs.asdict(report)


def progress(text: str) -> None:
    print(f"... {text}", file=sys.stderr, flush=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and memory of discovering and serving many endpoints."
    )
    parser.add_argument("--endpoints", type=_positive, default=10_000)
    parser.add_argument("--polls", type=_positive, default=5)
    parser.add_argument("--json", metavar="FILE", help="write every number to FILE")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the run to FILE")
    parser.add_argument(
        "--keep", action="store_true", help="keep the working directory"
    )
    args = parser.parse_args(argv)
    if START_PORT + args.endpoints > 65536:
        parser.error(f"at most {65536 - START_PORT} endpoints fit from {START_PORT}")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        _raise_file_limit(args.endpoints + 1000)
    except BenchError as e:
        print(f"bench/reconcile.py: {e}", file=sys.stderr)
        return 1
    workdir = tempfile.mkdtemp(prefix="ngrokd-bench-reconcile-")
    log = open(os.path.join(workdir, "bench.log"), "w")  # noqa: SIM115
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(log),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
            )
        ],
        redirectStandardIO=False,
    )
    profiler = cProfile.Profile() if args.profile else None
    reports: list[Report] = []
    failed: list[BaseException] = []

    async def measure(_: Any) -> None:
        try:
            reports.append(await run(args, workdir))
        except Exception as e:
            failed.append(e)

    if profiler is not None:
        profiler.enable()
    try:
        react(lambda r: ensureDeferred(measure(r)), [])
    except SystemExit:
        pass
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        log.close()
    if failed or not reports:
        print(f"bench/reconcile.py: {failed[0] if failed else 'no result'}")
        print(f"the log is in {workdir}/bench.log", file=sys.stderr)
        return 1
    (report,) = reports
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(as_json(report), f, indent=2)
            f.write("\n")
        progress(f"wrote {args.json}")
    if report.listening != report.endpoints:
        print(
            f"only {report.listening} of {report.endpoints} endpoints listen;"
            f" the log is in {workdir}/bench.log",
            file=sys.stderr,
        )
        return 1
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
