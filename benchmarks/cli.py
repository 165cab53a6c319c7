"""Command line of the suite.

::

    python -m benchmarks                      # every scenario, full size
    python -m benchmarks --quick              # small counts (CI, the quick test)
    python -m benchmarks --scenario rpc --repeat 7 --json-out /tmp/rpc.json
    python -m benchmarks --scenario bulk --update-docs   # and regenerate docs/benchmarks.md

The table goes to stdout, progress to stderr, and the whole record (machine,
versions, configuration, every repetition's raw figures) to
``benchmarks/results/<UTC timestamp>.json`` unless ``--json-out`` says otherwise;
one PNG chart per scenario group goes to the directory of the same name without
``.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from ._harness import (
    SCHEMA_VERSION,
    RunConfig,
    default_results_path,
    log,
    machine_info,
    render_scenario,
    write_json,
)
from .report import charts_dir, make_charts, update_docs
from .scenarios import SCENARIOS

MIN_REPEAT = 5


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small counts: seconds, not minutes")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=MIN_REPEAT,
        help=f"repetitions per contender; figures are their median (default {MIN_REPEAT})",
    )
    parser.add_argument(
        "--json-out", type=Path, metavar="PATH", help="write the JSON record here instead"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="dump cProfile stats of our peer processes into DIR (slows them down)",
    )
    parser.add_argument(
        "--no-charts",
        action="store_true",
        help="do not draw the PNG charts next to the JSON record",
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="regenerate docs/benchmarks.md from the newest records in benchmarks/results/",
    )
    parser.add_argument(
        "--disk",
        action="store_true",
        help="transfer scenarios: keep files in a disk temp dir instead of RAM (/dev/shm)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios, print their tables, save the JSON record."""
    args = build_parser().parse_args(argv)
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    if args.repeat < MIN_REPEAT:
        log(f"warning: --repeat {args.repeat} < {MIN_REPEAT}: medians will be unstable")
    config = RunConfig(
        quick=args.quick, repeat=args.repeat, profile_dir=args.profile, disk=args.disk
    )
    names = args.scenario or list(SCENARIOS)
    started_at = time.time()
    document: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "suite": "conduit benchmarks",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "command": [Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]
        if argv is None
        else ["python", "-m", "benchmarks", *argv],
        "mode": config.mode,
        "repeat": config.repeat,
        "machine": machine_info(),
        "scenarios": {},
    }
    for name in names:
        log(f"scenario {name} ({config.mode}, {config.repeat} repetitions)")
        result = SCENARIOS[name](config)
        document["scenarios"][name] = result.as_json()
        print(render_scenario(result, config.mode), flush=True)
        print(flush=True)
    document["duration_s"] = time.time() - started_at
    with contextlib.suppress(OSError):
        document["machine"]["load_average_at_end"] = list(os.getloadavg())
    path = args.json_out or default_results_path(started_at)
    write_json(document, path)
    print(f"results: {path}", flush=True)
    if not args.no_charts:
        try:
            charts = make_charts(path)
        except RuntimeError as exc:
            document["charts_error"] = str(exc)
            log(f"charts not drawn: {exc}")
        else:
            document["charts"] = [str(chart.relative_to(path.parent)) for chart in charts]
            print(f"charts: {charts_dir(path)}/ ({len(charts)} PNG)", flush=True)
        write_json(document, path)
    if args.update_docs:
        print(f"docs: {update_docs()}", flush=True)
    return 0
