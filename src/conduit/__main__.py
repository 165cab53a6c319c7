"""``python -m conduit``: the command-line entry point."""

from __future__ import annotations

import argparse
import sys

from . import _demo


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; return the exit code."""
    parser = argparse.ArgumentParser(prog="conduit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run a server and a client on loopback and show them talk"
    )
    demo.add_argument("--calls", type=int, default=2000, help="RPC calls to time (default 2000)")
    args = parser.parse_args(argv)
    assert args.command == "demo"  # argparse refuses anything else
    return _demo.run(calls=args.calls)


if __name__ == "__main__":
    sys.exit(main())
