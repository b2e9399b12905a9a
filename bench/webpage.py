"""
The web page benchmark: how fast a daemon serving many endpoints answers
its page.

    python bench/webpage.py [--endpoints 10000] [--requests 50]

One process runs the devcloud with C{--endpoints} bound endpoints (as
C{bench/reconcile.py} makes them) and the daemon as C{twistd ngrokd} builds
it, health server and web page included, in network mode on 127.0.0.1. Once
every endpoint listens, it asks the page over HTTP on loopback (one
keep-alive connection, so the time is the server's) C{--requests} times for
each of: the first page, a page in the middle, a name filter matching one
endpoint, and a state filter matching none, and prints the median, 99th
percentile and slowest answer of each, with the size of the answer. Every
answer must be 200 and hold its rows.

This is not a test: it asserts nothing about speed. It fails (exit status 1)
when an answer is wrong or the endpoints do not all listen. Linux or macOS.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import attrs
from reconcile import (
    COLD_TIMEOUT,
    REGISTER_TIMEOUT,
    START_PORT,
    BenchError,
    _listening,
    _raise_file_limit,
    _wait,
    endpoint_urls,
    progress,
)
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from ngrokd.config import load_config
from ngrokd.control.health import HealthService
from ngrokd.control.page import render_page
from ngrokd.devcloud.tap import start_devcloud
from ngrokd.tap import build_daemon

HEALTH_PORT = 19999


@attrs.frozen
class Timing:
    """
    One kind of request: its path, and each answer's time and size.
    """

    path: str
    seconds: tuple[float, ...]
    size: int

    def row(self) -> str:
        ms = sorted(s * 1000 for s in self.seconds)
        p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
        return (
            f"{self.path:<24} {statistics.median(ms):8.1f} {p99:8.1f}"
            f" {ms[-1]:8.1f} {self.size / 1024:8.0f}"
        )


async def run(args: argparse.Namespace, workdir: str) -> list[Timing]:
    devcloud = start_devcloud(
        reactor, os.path.join(workdir, "devcloud"), start_port=START_PORT
    )
    try:
        for url in endpoint_urls(args.endpoints):
            devcloud.cloud.add_endpoint(url, ("127.0.0.1", 9))
        loaded = load_config(devcloud.config_path, environ={}).config
        config = attrs.evolve(
            loaded,
            server=attrs.evolve(loaded.server, health_address=f"127.0.0.1:{args.port}"),
            bound_endpoints=attrs.evolve(loaded.bound_endpoints, poll_interval=3600),
        )
        daemon = build_daemon(config, reactor)
        daemon.startService()
        try:
            progress(f"waiting for {args.endpoints} endpoints to listen")
            await _wait(lambda: daemon.registered, "registration", REGISTER_TIMEOUT)
            await _wait(
                lambda: _listening(daemon) == args.endpoints,
                "every listener",
                COLD_TIMEOUT,
            )
            health = daemon.getServiceNamed("health")  # type: ignore[no-untyped-call]
            assert isinstance(health, HealthService)
            if health.port is None:
                raise BenchError(f"the health server could not listen: {health.error}")
            middle = args.endpoints // 100
            asks = [
                ("/", "Endpoints 1&ndash;50 of"),
                (f"/?page={middle}", f"page {middle:,} of"),
                ("/?q=svc9999.ns49", "svc9999.ns49"),
                ("/?state=failed", "No endpoint matches."),
            ]
            timings = [await measure(args, path, expect) for path, expect in asks]
            return [*timings, *in_process(args, daemon, health)]
        finally:
            await daemon.stopService()
    finally:
        await devcloud.stop()


async def measure(args: argparse.Namespace, path: str, expect: str) -> Timing:
    progress(f"GET {path} x {args.requests}")
    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent(reactor, pool=pool)
    url = f"http://127.0.0.1:{args.port}{path}".encode()
    seconds = []
    size = 0
    try:
        for _ in range(args.requests):
            started = time.perf_counter()
            response = await agent.request(b"GET", url)
            body = await readBody(response)
            seconds.append(time.perf_counter() - started)
            if response.code != 200 or expect.encode() not in body:
                raise BenchError(f"GET {path}: {response.code}, without {expect!r}")
            size = len(body)
    finally:
        await pool.closeCachedConnections()
    return Timing(path, tuple(seconds), size)


def in_process(
    args: argparse.Namespace, daemon: Any, health: HealthService
) -> list[Timing]:
    """
    The same work without HTTP: the status rows alone, then the first page
    made from them.
    """
    progress("in process")
    rows, page = [], []
    for _ in range(args.requests):
        started = time.perf_counter()
        daemon.endpoint_status()
        rows.append(time.perf_counter() - started)
        started = time.perf_counter()
        html = render_page(health.web.page_data({}))
        page.append(time.perf_counter() - started)
    return [
        Timing("(status rows alone)", tuple(rows), 0),
        Timing("(rows + page, no HTTP)", tuple(page), len(html)),
    ]


def table(args: argparse.Namespace, timings: list[Timing]) -> str:
    head = f"{'GET':<24} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'KiB':>8}"
    return "\n".join(
        [
            f"{args.endpoints} endpoints, {args.requests} requests each",
            head,
            *(t.row() for t in timings),
            f"machine: {platform.machine()} {os.cpu_count()} CPUs,"
            f" {platform.python_implementation()} {platform.python_version()}",
        ]
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="How fast the web page answers with many endpoints."
    )
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--port", type=int, default=HEALTH_PORT)
    args = parser.parse_args(argv)
    if not 100 <= args.endpoints <= 65536 - START_PORT:
        parser.error(f"--endpoints must be 100..{65536 - START_PORT}")
    if args.requests < 1:
        parser.error("--requests must be 1 or more")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="ngrokd-bench-webpage-")
    results: list[list[Timing]] = []
    failed: list[BaseException] = []

    async def go(_: Any) -> None:
        try:
            _raise_file_limit(args.endpoints + 1000)
            results.append(await run(args, workdir))
        except Exception as e:
            failed.append(e)

    try:
        react(lambda r: ensureDeferred(go(r)), [])
    except SystemExit:
        pass
    shutil.rmtree(workdir, ignore_errors=True)
    if failed or not results:
        print(f"bench/webpage.py: {failed[0] if failed else 'no result'}")
        return 1
    print(table(args, results[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
