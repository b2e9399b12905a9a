"""
The observed benchmark: what looking at the daemon costs its data path.

    python bench/observe.py [--endpoints 10000] [--virtual] [--connections 1000]
                            [--json FILE] [--profile FILE] [--keep]

Everything runs in a throwaway network namespace of its own (as the tests
make them, L{ngrokd.test.namespace}), so that ngrokd's thousands of
listeners, or its thousands of addresses, touch nothing of this machine:
the echo backend, a devcloud with C{--endpoints} bound endpoints in a
process of its own (C{bench/_cloud.py}: C{tcp://echo.bench:7} and
C{tcp://dbN.nsM:5432} ones, 100 to a page), and ngrokd (C{twistd ngrokd})
in network mode on 127.0.0.1 (ports from 20000), or with C{--virtual} an
address per endpoint on its interface.

It measures:

  - cold start: from ngrokd's start (registration included) to C{/readyz}
    answering 200 (every endpoint listening), and ngrokd's RSS then;
  - quiet: C{--connections} new connections to the echo endpoint one after
    the other (connect, one byte, its echo), after 5 that do not count:
    p50, p99, the slowest and how many took over 50 ms;
  - observed: the same while C{bench/_observer.py} looks as an operator
    would: four C{/events} streams open, and C{/metrics}, C{/status} and
    C{/} fetched once a second; the time of each of those requests;
  - ngrokd's RSS after, its peak, and every warning it logged of a control
    request holding the reactor over 20 ms.

It prints a table, then one line per target (C{target: WHAT: VALUE (met|
missed)}): at 10,000 endpoints the observed p99 at most 1.2 times the
quiet one, no connection slower than 50 ms in either phase, C{/metrics}
under 50 ms and C{/} under 20 ms (medians), no control request holding
the reactor over 20 ms, RSS under 200 MB; at 50,000, a cold start under 30
s and RSS under 600 MB. A target is a measurement: a missed one does not
change the exit status, which is 1 only when something fails (a connection,
a request, the daemon). C{--profile FILE} records ngrokd with py-spy during
the observed phase (collapsed stacks). Linux, as root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from attrs import asdict, frozen
from datapath import (
    ECHO,
    WARMUP_CONNECTIONS,
    BenchError,
    Child,
    Children,
    Latency,
    _die_with_parent,
    first_byte_seconds,
    free_ports,
    start_backends,
    twistd,
    wait_until,
)

from ngrokd.config import load_config
from ngrokd.host import allocation

START_PORT = 20000
#: The devcloud's own poll interval is 5 s; an operator's is the default.
POLL_INTERVAL = 30
SLOW_MS = 50.0
#: Seconds left to the daemon after it is ready, before the first phase.
SETTLE = 5.0
CLOUD_TIMEOUT = 300.0
READY_TIMEOUT = 900.0
OBSERVER_TIMEOUT = 120.0
_HELD = re.compile(r"(?P<request>.+?) held the reactor for (?P<ms>\d+) ms")


@frozen
class Phase:
    """
    The new connections of one phase.
    """

    latency: Latency
    over_50ms: int


@frozen
class Requests:
    """
    One kind of request of the observer, in ms.
    """

    path: str
    count: int
    failed: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    bytes: int


@frozen
class Report:
    endpoints: int
    mode: str
    cold_start_s: float
    rss_ready_mb: float
    quiet: Phase
    observed: Phase
    requests: tuple[Requests, ...]
    held: tuple[tuple[str, int], ...]
    rss_after_mb: float
    rss_peak_mb: float
    machine: str
    load_average: tuple[float, float, float]


def progress(message: str) -> None:
    print(f"observe: {message}", file=sys.stderr, flush=True)


def raise_file_limit(needed: int) -> None:
    """
    Open files for every listener and then some (as root, above the hard
    limit if need be); the children inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (ValueError, OSError) as e:
            raise BenchError(f"{needed} open files are needed: {e}") from None
    elif soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise BenchError(f"/proc/{pid}/status has no {field}")


def start_cloud(children: Children, workdir: Path, count: int, echo: int) -> Path:
    """
    The devcloud with C{count} endpoints; the ngrokd config it writes.
    """
    state = workdir / "devcloud"
    script = Path(__file__).with_name("_cloud.py")
    argv = [sys.executable, str(script), str(state), str(count), str(echo)]
    child = children.spawn("devcloud", [*argv, str(START_PORT)])
    info = state / "devcloud.json"

    def written() -> Path | None:
        try:
            return Path(json.loads(info.read_text())["config"])
        except (OSError, ValueError):
            return None

    return wait_until(written, CLOUD_TIMEOUT, "the devcloud", [child])


def write_config(workdir: Path, cloud_config: Path, args: argparse.Namespace) -> Path:
    config = yaml.safe_load(cloud_config.read_text())
    server = config.setdefault("server", {})
    server["health_address"] = f"127.0.0.1:{free_ports(1)[0]}"
    server["socket_path"] = str(workdir / "ngrokd.sock")
    discovery = config.setdefault("bound_endpoints", {})
    discovery["max_endpoints"] = max(args.endpoints, 10000)
    discovery["poll_interval"] = POLL_INTERVAL
    net = config.setdefault("net", {})
    net["listen_interface"] = "virtual" if args.virtual else "127.0.0.1"
    net["start_port"] = START_PORT
    hosts = workdir / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n")
    net["hosts_file"] = str(hosts)
    path = workdir / "ngrokd.yaml"
    path.touch(mode=0o600)  # it holds the devcloud's API key
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ready(health: str) -> bool | None:
    try:
        with urllib.request.urlopen(f"http://{health}/readyz", timeout=5) as answer:
            return True if answer.status == 200 else None
    except (OSError, urllib.error.HTTPError):
        return None


def echo_address(config_path: Path) -> tuple[str, int]:
    """
    Where ngrokd serves the echo endpoint, from the allocations it saved.
    """
    config = load_config(str(config_path)).config
    kept = allocation.load(config.server.state_dir, config.net.subnet)
    if config.net.listen_interface == "virtual":
        return str(kept.ips["echo.bench"]), 7
    return "127.0.0.1", kept.network_ports[("echo.bench", 7)]


def connections(address: tuple[str, int], count: int) -> Phase:
    for _ in range(WARMUP_CONNECTIONS):
        first_byte_seconds(address)
    seconds = [first_byte_seconds(address) for _ in range(count)]
    slow = sum(1 for s in seconds if s * 1000 > SLOW_MS)
    return Phase(Latency.of(seconds), slow)


def observed(
    address: tuple[str, int],
    count: int,
    health: str,
    workdir: Path,
    profile: str | None,
    daemon: Child,
) -> tuple[Phase, list[Any]]:
    """
    L{connections} while the observer looks; its requests.
    """
    script = Path(__file__).with_name("_observer.py")
    with open(workdir / "observer.log", "wb") as errors:
        observer = subprocess.Popen(
            [sys.executable, str(script), health],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            preexec_fn=_die_with_parent,
        )
    assert observer.stdin is not None and observer.stdout is not None
    spy = None
    try:
        line = observer.stdout.readline()
        if line != b"ready\n":
            raise BenchError(f"the observer did not start: {line!r}")
        if profile:
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--pid",
                    str(daemon.pid),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    profile,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        phase = connections(address, count)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(OBSERVER_TIMEOUT)
        # Its stdin closed: it stops and says what it saw.
        out, _ = observer.communicate(b"", timeout=OBSERVER_TIMEOUT)
    return phase, json.loads(out.decode().strip().splitlines()[-1])["requests"]


def summarise(requests: list[Any]) -> tuple[Requests, ...]:
    found = []
    for path in ("/metrics", "/status", "/"):
        seconds = [s for p, s, _ in requests if p == path and s >= 0]
        failed = sum(1 for p, s, _ in requests if p == path and s < 0)
        sizes = [n for p, s, n in requests if p == path and s >= 0]
        if not seconds:
            raise BenchError(f"no GET {path} was answered")
        ms = sorted(s * 1000 for s in seconds)
        p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
        found.append(
            Requests(
                path,
                len(ms),
                failed,
                statistics.median(ms),
                p99,
                ms[-1],
                max(sizes),
            )
        )
    return tuple(found)


def held(log: Path) -> tuple[tuple[str, int], ...]:
    """
    The warnings of control requests that held the reactor over 20 ms.
    """
    text = log.read_text(encoding="utf-8", errors="replace")
    return tuple(
        (m["request"].rsplit("] ", 1)[-1], int(m["ms"])) for m in _HELD.finditer(text)
    )


def run(args: argparse.Namespace, workdir: Path) -> Report:
    raise_file_limit(args.endpoints + 2000)
    children = Children(workdir)
    try:
        progress("starting the echo backend")
        backends_child, backends = start_backends(children, workdir)
        progress(f"starting a devcloud with {args.endpoints} endpoints")
        cloud_config = start_cloud(
            children, workdir, args.endpoints, backends.address(ECHO)[1]
        )
        config = write_config(workdir, cloud_config, args)
        health = load_config(str(config)).config.server.health_address
        progress("starting ngrokd: the cold start")
        started = time.monotonic()
        daemon = children.spawn(
            "ngrokd", [twistd(), "-n", "--pidfile=", "ngrokd", "--config", str(config)]
        )
        wait_until(lambda: ready(health), READY_TIMEOUT, "ngrokd ready", [daemon])
        cold = time.monotonic() - started
        rss_ready = rss_mb(daemon.pid)
        address = echo_address(config)
        time.sleep(SETTLE)
        progress(f"quiet: {args.connections} new connections")
        quiet = connections(address, args.connections)
        progress(f"observed: {args.connections} new connections, the daemon looked at")
        phase, requests = observed(
            address, args.connections, health, workdir, args.profile, daemon
        )
        daemon.check()
        return Report(
            endpoints=args.endpoints,
            mode="virtual" if args.virtual else "network",
            cold_start_s=cold,
            rss_ready_mb=rss_ready,
            quiet=quiet,
            observed=phase,
            requests=summarise(requests),
            held=held(daemon.log),
            rss_after_mb=rss_mb(daemon.pid),
            rss_peak_mb=rss_mb(daemon.pid, "VmHWM"),
            machine=f"{platform.machine()} {os.cpu_count()} CPUs,"
            f" {platform.python_implementation()} {platform.python_version()}",
            load_average=os.getloadavg(),
        )
    finally:
        children.stop_all()


def targets(report: Report) -> list[tuple[str, float, float, bool]]:
    """
    What, value, bound, met: the targets for the run's size.
    """
    found = []
    requests = {r.path: r for r in report.requests}
    if report.endpoints >= 10_000:
        ratio = report.observed.latency.p99_ms / report.quiet.latency.p99_ms
        slowest = max(report.quiet.latency.max_ms, report.observed.latency.max_ms)
        longest = max((ms for _, ms in report.held), default=0)
        found += [
            ("observed p99 / quiet p99", ratio, 1.2, ratio <= 1.2),
            ("slowest connection, either phase (ms)", slowest, 50, slowest < 50),
            (
                "GET /metrics median (ms)",
                requests["/metrics"].p50_ms,
                50,
                requests["/metrics"].p50_ms < 50,
            ),
            ("GET / median (ms)", requests["/"].p50_ms, 20, requests["/"].p50_ms < 20),
            ("longest hold by a control request (ms)", longest, 20, longest <= 20),
        ]
    if report.endpoints >= 50_000:
        found += [
            ("cold start (s)", report.cold_start_s, 30, report.cold_start_s < 30),
            ("RSS (MB)", report.rss_peak_mb, 600, report.rss_peak_mb < 600),
        ]
    elif report.endpoints >= 10_000:
        found.append(("RSS (MB)", report.rss_peak_mb, 200, report.rss_peak_mb < 200))
    return found


def table(report: Report) -> str:
    q, o = report.quiet, report.observed
    rows = [
        f"{report.endpoints} endpoints, {report.mode} mode",
        f"cold start to ready               {report.cold_start_s:8.2f} s",
        f"RSS ready / after / peak          {report.rss_ready_mb:6.0f} /"
        f" {report.rss_after_mb:.0f} / {report.rss_peak_mb:.0f} MB",
        "new connection (ms)                  quiet   observed",
        *(
            f"  {name:<31} {a:8.1f} {b:10.1f}"
            for name, a, b in [
                ("p50", q.latency.p50_ms, o.latency.p50_ms),
                ("p99", q.latency.p99_ms, o.latency.p99_ms),
                ("slowest", q.latency.max_ms, o.latency.max_ms),
            ]
        ),
        f"  over 50 ms                      {q.over_50ms:8d} {o.over_50ms:10d}",
        "request (ms)                     p50      p99      max    KiB  failed",
    ]
    for r in report.requests:
        rows.append(
            f"  GET {r.path:<25} {r.p50_ms:8.1f} {r.p99_ms:8.1f} {r.max_ms:8.1f}"
            f" {r.bytes / 1024:6.0f} {r.failed:7d}"
        )
    rows.append(f"control requests holding the reactor over 20 ms: {len(report.held)}")
    rows += [f"  {request}: {ms} ms" for request, ms in report.held[:10]]
    load = ", ".join(f"{x:.1f}" for x in report.load_average)
    rows.append(f"machine: {report.machine}; load average {load}")
    rows += [
        f"target: {what}: {value:.1f} (bound {bound}) ({'met' if met else 'missed'})"
        for what, value, bound, met in targets(report)
    ]
    return "\n".join(rows)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="What looking at the daemon costs its data path."
    )
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--virtual", action="store_true")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.endpoints < 1 or args.connections < 2:
        parser.error("--endpoints must be 1 or more, --connections 2 or more")
    if not args.virtual and START_PORT + args.endpoints > 65535:
        parser.error(f"network mode fits {65535 - START_PORT} endpoints: --virtual")
    for name in ("json", "profile"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if not args.inside:
        return in_namespace(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ngrokd-bench-observe-"))
    try:
        report = run(args, workdir)
    except (BenchError, OSError, subprocess.SubprocessError) as e:
        print(f"observe: {e}\nthe logs are in {workdir}", file=sys.stderr)
        return 1
    print(table(report))
    if args.json:
        data = asdict(report)
        data["targets"] = [
            {"what": w, "value": v, "bound": b, "met": m}
            for w, v, b, m in targets(report)
        ]
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def in_namespace(argv: Sequence[str]) -> int:
    """
    Run this benchmark again inside a network namespace of its own.
    """
    from ngrokd.test.namespace import Namespace, unavailable

    why = unavailable()
    if why is not None:
        print(f"observe: {why}", file=sys.stderr)
        return 1
    namespace = Namespace.start()
    try:
        command = [sys.executable, os.path.abspath(__file__), *argv, "--inside"]
        return subprocess.call(namespace.command(command))
    finally:
        namespace.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
