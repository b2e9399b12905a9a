"""
Bulk data through ngrokd, both ways, beside the stunnel pair, in rounds.

    python bench/bulk.py [--rounds 4] [--mib 256] [--tree NAME=PATH ...]
        [--json FILE]

What C{bench/datapath.py} measures of bulk data (one stream, eight streams,
from the backend to the client) plus an echo (as much each way at once),
without its other phases, repeated: each round measures every path once,
one after the other, so that on a machine shared with other work each path
meets much the same load. The medians of the rounds are what to compare.

Each C{--tree} is a checkout of ngrokd (another branch's worktree, or
C{git archive} of a commit unpacked somewhere) whose devcloud and daemon
run with C{PYTHONPATH} set to it, so that versions are compared in one run;
by default the checkout this file is in. Everything runs on 127.0.0.1 as in
C{bench/datapath.py}, whose processes and helpers this reuses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from _proc import cpu_seconds
from _stunnel import find_stunnel
from attrs import asdict, frozen
from datapath import (
    ECHO,
    IDLE_TIMEOUT,
    SOURCE,
    Address,
    BenchError,
    Children,
    ConnectionFailed,
    MiB,
    Settings,
    WrongData,
    _fast_socket,
    _sigterm_interrupts,
    measure_bulk,
    progress,
    pull,
    start_backends,
    start_daemon,
    start_devcloud,
    start_stunnel,
    stunnel_services,
    write_daemon_config,
)

#: Each path's two processes: ngrokd and the devcloud, or the stunnel pair's
#: client and server.
SIDES = ("client side", "server side")
PHASES = ("1 stream", "8 streams", "echo")
ECHO_CHUNK = 256 * 1024
#: ngrokd's settings here: no relay, early data on, and a pool that
#: outlives the run.
SETTINGS = Settings(
    latency_connections=1,
    bulk_bytes=0,
    parallel_connections=8,
    parallel_bytes_each=0,
    concurrency=1,
    direct_only=False,
    settle_seconds=0,
    delay_ms=0,
    early_data=True,
    pool_linger=600,
)


@frozen
class Way:
    """
    One way to the backends: its two processes, its echo and source
    addresses.
    """

    name: str
    pids: tuple[int, int]
    echo: Address
    source: Address


@frozen
class Sample:
    mb_per_s: float
    #: CPU seconds per GB (10^9 bytes) moved, of each of the two processes.
    cpu_s_per_gb: tuple[float, float]


def echo_both_ways(address: Address, size: int) -> None:
    """
    Send C{size} bytes to the echo server while reading its echo, until all
    of it is back.

    @raise WrongData: the echo ended short.
    """
    chunk = memoryview(bytes(ECHO_CHUNK))
    received = 0

    def read() -> None:
        nonlocal received
        buffer = bytearray(ECHO_CHUNK)
        while received < size and (n := sock.recv_into(buffer)):
            received += n

    with _fast_socket(address) as sock:
        sock.settimeout(IDLE_TIMEOUT)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sent = 0
        while sent < size:
            piece = chunk[: min(len(chunk), size - sent)]
            sock.sendall(piece)
            sent += len(piece)
        reader.join(IDLE_TIMEOUT)
    if received != size:
        raise WrongData(f"{address[0]}:{address[1]} echoed {received} of {size}")


def measure(path: Way, phase: str, size: int) -> Sample:
    """
    Move C{size} bytes through C{path} as C{phase} says.
    """
    actions: dict[str, Callable[[], object]] = {
        "1 stream": lambda: pull(path.source, size, time.monotonic() + 600),
        "8 streams": lambda: measure_bulk(path.source, 8, size // 8),
        "echo": lambda: echo_both_ways(path.echo, size // 2),
    }
    before = [cpu_seconds(pid) for pid in path.pids]
    start = time.perf_counter()
    try:
        actions[phase]()
    except OSError as e:
        raise ConnectionFailed(f"{path.name}, {phase}: {e}") from None
    seconds = time.perf_counter() - start
    gb = size / 1e9
    cpu = [
        (cpu_seconds(pid) - b) / gb for pid, b in zip(path.pids, before, strict=True)
    ]
    return Sample(size / seconds / 1e6, (cpu[0], cpu[1]))


def start_paths(children: Children, workdir: Path, trees: dict[str, Path]) -> list[Way]:
    """
    The backends, the stunnel pair (when there is one), and a devcloud and
    ngrokd from each tree.
    """
    _, backends = start_backends(children, workdir)
    paths = []
    stunnel = find_stunnel()
    if stunnel is None:
        progress("stunnel is not on PATH: no C baseline")
    else:
        pair = start_stunnel(children, workdir, stunnel_services(backends), stunnel)
        paths.append(
            Way(
                "stunnel",
                (pair.client.pid, pair.server.pid),
                pair.address(ECHO),
                pair.address(SOURCE),
            )
        )
    for name, tree in trees.items():
        os.environ["PYTHONPATH"] = str(tree)  # the children's
        place = workdir / name
        place.mkdir()
        devcloud = start_devcloud(children, place, backends)
        config = write_daemon_config(place, devcloud, devcloud.ingress_port, SETTINGS)
        daemon = start_daemon(children, devcloud, config)
        paths.append(
            Way(
                name,
                (daemon.child.pid, devcloud.child.pid),
                daemon.address(ECHO),
                daemon.address(SOURCE),
            )
        )
    return paths


def median(samples: Sequence[Sample]) -> Sample:
    return Sample(
        statistics.median(s.mb_per_s for s in samples),
        (
            statistics.median(s.cpu_s_per_gb[0] for s in samples),
            statistics.median(s.cpu_s_per_gb[1] for s in samples),
        ),
    )


def line(name: str, phase: str, sample: Sample) -> str:
    client, server = sample.cpu_s_per_gb
    return (
        f"{phase:10} {name:12} {sample.mb_per_s:8.1f} MB/s"
        f"   CPU s/GB {client:5.2f} {server:5.2f}"
    )


def run(args: argparse.Namespace, children: Children, workdir: Path) -> int:
    paths = start_paths(children, workdir, dict(args.tree))
    size = args.mib * MiB
    samples: dict[tuple[str, str], list[Sample]] = {}
    for index in range(args.rounds):
        for path in paths:
            for phase in PHASES:
                sample = measure(path, phase, size)
                samples.setdefault((phase, path.name), []).append(sample)
                progress(f"round {index + 1}: {line(path.name, phase, sample)}")
    print(
        f"medians of {args.rounds} rounds of {args.mib} MiB per phase;"
        " CPU of ngrokd and the devcloud, or of stunnel's client and server"
    )
    medians = {key: median(found) for key, found in samples.items()}
    for phase in PHASES:
        for path in paths:
            print(line(path.name, phase, medians[phase, path.name]))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": [sys.executable, *sys.argv],
                    "trees": {name: str(tree) for name, tree in args.tree},
                    "rounds": {
                        f"{phase}/{name}": [asdict(s) for s in found]
                        for (phase, name), found in samples.items()
                    },
                    "medians": {
                        f"{phase}/{name}": asdict(s)
                        for (phase, name), s in medians.items()
                    },
                },
                indent=2,
            )
            + "\n"
        )
    return 0


def _tree(text: str) -> tuple[str, Path]:
    name, sep, where = text.partition("=")
    tree = Path(where)
    if not sep or not name or not (tree / "ngrokd" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(
            f"{text!r}: give NAME=PATH, PATH a checkout of ngrokd"
        )
    return name, tree.resolve()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="default 4")
    parser.add_argument(
        "--mib", type=int, default=256, help="MiB moved per phase (default 256)"
    )
    add_tree_option(parser)
    parser.add_argument("--json", metavar="FILE", help="write every sample to FILE")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.mib < 8:
        parser.error("--rounds must be at least 1 and --mib at least 8")
    check_trees(parser, args)
    return args


def add_tree_option(parser: argparse.ArgumentParser) -> None:
    """
    C{--tree NAME=PATH}, repeatable: the checkouts of ngrokd a run compares.
    """
    parser.add_argument(
        "--tree",
        type=_tree,
        action="append",
        metavar="NAME=PATH",
        help="a checkout of ngrokd to run (repeatable; default this one)",
    )


def check_trees(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """
    No C{--tree}: this checkout alone; and each tree a name of its own.
    """
    if not args.tree:
        args.tree = [("ngrokd", Path(__file__).resolve().parent.parent)]
    if len({name for name, _ in args.tree}) != len(args.tree):
        parser.error("each --tree needs a name of its own")


def run_in_workdir(
    prog: str,
    run: Callable[[argparse.Namespace, Children, Path], int],
    args: argparse.Namespace,
) -> int:
    """
    C{run} in a new working directory, its children stopped however it
    ends; the directory is removed unless the run failed (its logs are
    there).
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"ngrokd-{prog}-"))
    children = Children(workdir)
    try:
        with _sigterm_interrupts():
            try:
                status = run(args, children, workdir)
            finally:
                children.stop_all()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        status = 130
    except BenchError as e:
        print(f"{prog}: FAILED: {e} (logs in {workdir})", file=sys.stderr)
        return 1
    shutil.rmtree(workdir)
    return status


def main(argv: Sequence[str]) -> int:
    return run_in_workdir("bulk", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
