"""Shared set-up of the atheris harnesses: import paths and the oracle.

The oracle lives in ``tests/hostile_helpers.py`` (the Hypothesis properties use
the same one): only ``conduit.errors.ProtocolError`` (and, for sealed records,
``IntegrityError``) may escape the sans-IO layer, and a decoded body may not hold
more data than its payload carried. Anything else is left to propagate, which
atheris reports as a crash and saves as ``crash-<sha1>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT / "src", ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import os  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402

from hostile_helpers import AmplificationError  # noqa: E402

#: With CONDUIT_FUZZ_SKIP_KNOWN=1 the findings already reported (and pinned by
#: regression tests) are counted instead of stopping the run, so a long run
#: keeps looking for new ones. Without it, every finding stops the fuzzer.
SKIP_KNOWN = os.environ.get("CONDUIT_FUZZ_SKIP_KNOWN") == "1"
KNOWN: Counter[str] = Counter()

#: Bytes fields that cattrs fills with bytes(int): the allocation bomb reported
#: as finding 1 (tests/test_fuzz_properties.py::test_bytes_fields_are_not_built_from_integers).
_KNOWN_AMPLIFIED = ("Confirm.mac", "ClientHello.pake", "ServerHello.pake")


def known_finding(exc: BaseException) -> str | None:
    """The id of an already reported finding ``exc`` is an instance of, if any."""
    if isinstance(exc, AmplificationError) and str(exc).startswith(_KNOWN_AMPLIFIED):
        return "bytes-from-int"
    if isinstance(exc, RecursionError):
        return "recursion-in-malformed-body-message"
    return None


def guarded(target: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """Wrap a harness so that known findings are counted, not fatal, in SKIP_KNOWN mode."""
    if not SKIP_KNOWN:
        return target

    def run(data: bytes) -> None:
        try:
            target(data)
        except (AmplificationError, RecursionError) as exc:
            finding = known_finding(exc)
            if finding is None:
                raise
            KNOWN[finding] += 1
            count = KNOWN[finding]
            if count & (count - 1) == 0:  # 1, 2, 4, 8, ...: libFuzzer exits without atexit
                print(f"KNOWN FINDING {finding}: hit {count} times", file=sys.stderr, flush=True)

    return run
