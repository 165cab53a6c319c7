"""``conduit get`` / ``conduit send`` across a cut connection: the user sees why it paused.

The CLI's client reconnects on its own (the descriptor's defaults: 5 attempts,
2 s first wait); the transfer resumes and the run succeeds, and the output
says "connection lost, reconnecting in 2 s, attempt 1/5", then "reconnected,
resuming". Real subprocesses, through the plain-socket proxy of
:mod:`cutting_proxy`.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from conduit.cli._display import FileJob, LiveDisplay, reconnecting_line
from cutting_proxy import CuttingProxy, Direction
from test_cli import PASSWORD, ServeProcess, _env, conduit, sha256, start_server, write_random
from transfer_helpers import partial_files as partials

SIZE = 32 * 1024 * 1024


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServeProcess]:
    serving = start_server(tmp_path)
    try:
        yield serving
    finally:
        serving.stop()


@pytest.mark.parametrize("output", ["lines", "json"])
@pytest.mark.parametrize("verb", ["get", "send"])
def test_cli_transfer_survives_a_cut(
    tmp_path: Path, served: ServeProcess, verb: str, output: str
) -> None:
    direction: Direction
    if verb == "get":
        source = write_random(served.directory / "big.bin", SIZE)
        direction = "s2c"
        args = ["get", "big.bin", "-o", str(tmp_path / "out")]
        landed = tmp_path / "out" / "big.bin"
    else:
        source = write_random(tmp_path / "big.bin", SIZE)
        direction = "c2s"
        args = ["send", str(source)]
        landed = served.directory / "big.bin"
    with CuttingProxy(served.port, cut_after=(direction, int(SIZE * 0.4))) as proxy:
        where = "--from" if verb == "get" else "--to"
        json_flag = ["--json"] if output == "json" else []
        result = conduit(*args, where, f"127.0.0.1:{proxy.port}", *json_flag, timeout=120)
    assert result.returncode == 0, (result.stdout, result.stderr)
    # The connection's lines go to stderr, stdout keeps the files' lines (or
    # the one document): until 2026-12-05 a script saw nothing while it
    # waited under --json; until 2026-12-07 they were on stdout without it.
    status = result.stderr
    assert "conduit: connection lost, reconnecting in " in status, status
    assert "attempt 1/5" in status and "conduit: reconnected, resuming" in status, status
    assert "reconnect" not in result.stdout, result.stdout
    if output == "json":
        (entry,) = json.loads(result.stdout)["files"]
        assert entry["success"] is True and entry["resumed_from"] > 0, entry
    else:
        lines = result.stdout.splitlines()
        assert len(lines) == 2 and "(resumed at " in lines[0], lines
    assert proxy.accepted == 2
    assert sha256(landed) == sha256(source)


def test_reconnecting_line() -> None:
    assert reconnecting_line(2, 5, 2.0) == "connection lost, reconnecting in 2 s, attempt 2/5"
    assert reconnecting_line(7, 0, 60.0) == "connection lost, reconnecting in 60 s, attempt 7"


def test_live_display_shows_the_status_above_the_bars() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    job = FileJob(name="big.bin", local=None, size=100)
    with LiveDisplay("get", console, [job]) as display:
        display.file_started(job)
        display.status(reconnecting_line(1, 5, 2.0))
    assert "connection lost, reconnecting in 2 s, attempt 1/5" in buffer.getvalue()


def test_send_whose_reconnect_is_refused_the_password_exits_3(
    tmp_path: Path, served: ServeProcess
) -> None:
    # The server stops in the middle of the upload (Ctrl-C: it may be
    # restarting, so the client comes back) and is restarted under another
    # password: the transfer fails for the refused password, the exit of a
    # refused password (3), not of a failed transfer (1).
    source = write_random(tmp_path / "big.bin", SIZE)
    sending = subprocess.Popen(
        [sys.executable, "-m", "conduit", "send", str(source), "--to", served.address],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(CONDUIT_PASSWORD=PASSWORD),
    )
    restarted: ServeProcess | None = None
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size for p in partials(served.directory)):
            assert time.monotonic() < deadline and sending.poll() is None, "no upload began"
            time.sleep(0.02)
        served.stop()
        (tmp_path / "again").mkdir()
        restarted = start_server(
            tmp_path / "again", "--port", str(served.port), password="another password"
        )
        out, err = sending.communicate(timeout=120)
    finally:
        if sending.poll() is None:
            sending.kill()
            sending.communicate(timeout=10)
        if restarted is not None:
            restarted.stop()
    assert sending.returncode == 3, (out, err)
    assert "refused the reconnect" in out + err, (out, err)
