"""The ``conduit`` command-line tool: serve a directory, send, get and list files, demo.

Everything the tool needs beyond the library (click for the command line, rich
for progress bars) lives in the ``cli`` extra, so ``import conduit`` never
imports them and this package imports them only inside :func:`main`. Without
them, ``conduit`` prints a one-line hint and exits 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def missing_dependencies_hint() -> str:
    """The one-line hint printed when click or rich is missing."""
    from .._extras import install_hint

    return f"conduit: the command-line tool needs its extra packages: {install_hint('cli')}"


_CLI_PACKAGES = ("click", "rich")


def _missing_dependency() -> str | None:
    """The first CLI package that cannot be imported, or None when all can."""
    for name in _CLI_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            return name
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``conduit`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    The console script ``conduit`` and ``python -m conduit`` both call this.
    A Ctrl-C before the command has installed its own handling (while its
    modules are imported: about half a second) is exit 130, with no
    traceback (until 2026-12-07 it printed one, a review found).
    """
    try:
        if _missing_dependency() is not None:
            print(missing_dependencies_hint(), file=sys.stderr)
            return 2
        from ._app import run

        return run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print("conduit: interrupted", file=sys.stderr)
        return 130


__all__ = ["main", "missing_dependencies_hint"]
