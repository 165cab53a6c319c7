"""Complete programs, run as a user would with plain ``python``, across both worlds.

Servers and clients written for asyncio and for Trio, in every pairing, each in
its own process: the asyncio shim and the Trio core must interoperate on the
wire and each must stop cleanly on Ctrl-C.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROGRAMS = Path(__file__).resolve().parent / "programs"


def _start_server(kind: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, str(PROGRAMS / f"{kind}_server.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    line = process.stdout.readline()  # the server prints PORT <n> once listening
    if not line.startswith("PORT ") or time.monotonic() > deadline:
        process.kill()
        raise AssertionError(f"{kind} server did not start: {line!r} {process.communicate()}")
    return process, int(line.split()[1])


@pytest.mark.parametrize(
    ("server_kind", "client_kind"),
    [("asyncio", "asyncio"), ("trio", "asyncio"), ("asyncio", "trio"), ("trio", "trio")],
)
def test_programs_interoperate(server_kind: str, client_kind: str) -> None:
    server, port = _start_server(server_kind)
    try:
        client = subprocess.run(
            [sys.executable, str(PROGRAMS / f"{client_kind}_client.py"), str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr
        expected_loop = "trio" if server_kind == "trio" else "Loop"
        assert client.stdout.startswith(f"OK {client_kind}-client via "), client.stdout
        assert expected_loop in client.stdout
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=15)
        assert server.returncode != 0 or "KeyboardInterrupt" not in err
        assert "Task was destroyed" not in err and "abandoned" not in err, err
        assert "Exception ignored" not in err, err
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=10)
