"""
New connections through ngrokd beside the stunnel pair, in blocks that meet
the same load.

    python bench/newconn.py [--rounds 30] [--block 20] [--tree NAME=PATH ...]
        [--seed N] [--json FILE]

The latency phase of C{bench/datapath.py} (a new connection, one byte sent,
its echo read; the next connection once that one is closed), in rounds:
each round runs a block of C{--block} connections on every path, in an
order shuffled each round. On a machine shared with other work, every path
then meets much the same load, where phases one after the other can meet
very different loads; and no path always follows the same other one, whose
warm pool is replaced in the background as the next block starts. Within a
block, connections come one after the other as in C{bench/datapath.py}: the
pool meets a client that comes back as soon as it is answered.

The paths are those of C{bench/bulk.py} (whose start-up this uses): the
stunnel pair when stunnel is installed, and for each C{--tree} a devcloud
and an ngrokd run from that checkout, by default the one this file is in.
It prints, for each path, the p50, p90 and p99 of all its connections in ms
and their ratios to the stunnel pair's, and fails (exit status 1) only when
a connection fails.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from attrs import asdict
from bulk import add_tree_option, check_trees, run_in_workdir, start_paths
from datapath import (
    WARMUP_CONNECTIONS,
    Children,
    ConnectionFailed,
    Latency,
    first_byte_seconds,
    progress,
)

#: The path ratios are given against.
BASELINE = "stunnel"


def run(args: argparse.Namespace, children: Children, workdir: Path) -> int:
    paths = start_paths(children, workdir, dict(args.tree))
    for path in paths:  # each one's pool warmed, its sessions made
        for _ in range(WARMUP_CONNECTIONS):
            first_byte_seconds(path.echo)
    shuffle = random.Random(args.seed).shuffle
    seconds: dict[str, list[float]] = {path.name: [] for path in paths}
    for index in range(args.rounds):
        shuffle(paths)
        for path in paths:
            for _ in range(args.block):
                try:
                    seconds[path.name].append(first_byte_seconds(path.echo))
                except OSError as e:
                    raise ConnectionFailed(f"{path.name}: {e}") from None
        if (index + 1) % 10 == 0:
            progress(f"round {index + 1} of {args.rounds}")
    latencies = {name: Latency.of(found) for name, found in seconds.items()}
    print(
        f"{args.rounds} rounds of {args.block} new connections per path,"
        " connect to first echoed byte (ms)"
    )
    baseline = latencies.get(BASELINE)
    for name, latency in latencies.items():
        line = (
            f"{name:12} p50 {latency.p50_ms:7.3f}  p90 {latency.p90_ms:7.3f}"
            f"  p99 {latency.p99_ms:7.3f}"
        )
        if baseline is not None and name != BASELINE:
            line += (
                f"   / stunnel's: {latency.p50_ms / baseline.p50_ms:.2f}"
                f" {latency.p90_ms / baseline.p90_ms:.2f}"
                f" {latency.p99_ms / baseline.p99_ms:.2f}"
            )
        print(line)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": [sys.executable, *sys.argv],
                    "trees": {name: str(tree) for name, tree in args.tree},
                    "latency": {n: asdict(x) for n, x in latencies.items()},
                    "seconds": seconds,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="default 30")
    parser.add_argument(
        "--block",
        type=int,
        default=20,
        help="new connections per path and round (default 20)",
    )
    add_tree_option(parser)
    parser.add_argument("--seed", type=int, help="the shuffle's, to repeat an order")
    parser.add_argument("--json", metavar="FILE", help="write every time to FILE")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.block < 1:
        parser.error("--rounds and --block must be at least 1")
    check_trees(parser, args)
    return args


def main(argv: Sequence[str]) -> int:
    return run_in_workdir("newconn", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
