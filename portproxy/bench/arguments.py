"""The options of ``portproxy bench``, light to import (the CLI builds its parser from them)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .workloads import WORKLOADS


@dataclasses.dataclass(frozen=True)
class Options:
    seconds: float
    rounds: int
    connections: int
    mappings: int
    idle_connections: int
    slow_readers: int
    paths: list[str] | None
    workloads: list[str] | None
    memory: bool
    chart: bool
    quick: bool
    out: Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run (1 round of 1 s, fewer mappings and connections)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per run (default 5; quick: 1)")
    p.add_argument("--rounds", type=int, default=None, help="rounds over all paths (default 3; quick: 1)")
    p.add_argument("--connections", type=int, default=64, help="wrk's concurrent connections (default 64)")
    p.add_argument("--mappings", type=int, default=None, help="ports for the RSS figure (default 1000; quick: 50)")
    p.add_argument("--idle-connections", type=int, default=None,
                   help="idle connections for the per-connection memory figure (default 8000; quick: 200)")
    p.add_argument("--slow-readers", type=int, default=None,
                   help="never-reading clients for the pinned-kernel-memory figure (default 200; quick: 50; 0: skip)")
    p.add_argument("--paths", default=None, help="comma-separated path keys (default: every available one)")
    p.add_argument("--workloads", default=None,
                   help=f"comma-separated workload keys (default: all of {','.join(w.key for w in WORKLOADS)})")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="directory for bench.json, bench.md and bench.png (default ./bench-results)")


def options_from(args: argparse.Namespace) -> Options:
    def pick(value: float | None, full: float, quick: float) -> float:
        return value if value is not None else (quick if args.quick else full)

    return Options(
        seconds=pick(args.seconds, 5, 1), rounds=int(pick(args.rounds, 3, 1)), connections=args.connections,
        mappings=int(pick(args.mappings, 1000, 50)), idle_connections=int(pick(args.idle_connections, 8000, 200)),
        slow_readers=int(pick(args.slow_readers, 200, 50)),
        paths=args.paths.split(",") if args.paths else None,
        workloads=args.workloads.split(",") if args.workloads else None,
        memory=not args.no_memory, chart=not args.no_chart, quick=args.quick, out=args.out)
