"""``python -m conduit``: the same as the ``conduit`` command (see :mod:`conduit.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
