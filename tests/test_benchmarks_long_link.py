"""``python -m benchmarks.long_link``: transfers over a long link, side by side.

Real peers of this repository through a real delay proxy on loopback, real
files checked against their SHA-256; the assertions are about what the proxy
does and what the tool reports, never a speed.
"""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path

import pytest
from benchmarks import long_link


def _options(**overrides: object) -> argparse.Namespace:
    options = long_link.parse_args(["--rtt", "40", "--rate", "0", "--size", "2"])
    vars(options).update(overrides)
    return options


def test_the_proxy_delays_each_round_trip_and_keeps_the_bytes_in_order() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, long_link.delayed(listener.getsockname()[1], _options()) as port:
        client = socket.create_connection(("127.0.0.1", port))
        peer, _ = listener.accept()
        with client, peer:
            for turn in range(3):
                message = bytes([turn]) * 100_000
                started = time.monotonic()
                client.sendall(message)
                got = b""
                while len(got) < len(message):
                    got += peer.recv(65536)
                peer.sendall(b"k")
                assert client.recv(1) == b"k"
                # Half the round trip each way: never less (it is a delay line).
                assert time.monotonic() - started >= 0.040
                assert got == message


def test_a_window_limit_that_would_not_grow_is_refused() -> None:
    with pytest.raises(SystemExit):
        long_link.parse_args(["--grow", "4"])


def test_a_run_reports_tcp_and_conduit_side_by_side(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--rtt", "20", "--size", "2", "--netconduit-size", "0", "--grow", "8"]
    argv += ["--files", "12", "--file-kib", "3"]
    assert long_link.main(argv) == 0
    table = capsys.readouterr().out
    rows = {line.split("  ")[0].strip(): line for line in table.splitlines()[2:]}
    conduit = f"conduit ({Path(long_link.parse_args([]).tree).name})"
    growing, fixed = f"{conduit}, growing to 8 MiB", f"{conduit}, fixed window"
    assert set(rows) == {"tcp", conduit, fixed, growing}
    assert "MB/s" in table.splitlines()[0]
    # Up, down, then the calls made on the idle connection and during an
    # upload; and for the defaults, the directory up and down.
    assert len(rows[conduit].split()) - len(conduit.split()) == 16
    for other in (growing, fixed):
        assert len(rows[other].split()) - len(other.split()) == 12
    assert "directory down s" in table.splitlines()[0]
    assert len(rows["tcp"].split()) == 1 + 4
