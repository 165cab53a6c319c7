"""The guide's complete example, file_server.py + file_client.py, run exactly as printed.

Both programs are the File Transfer Guide's code blocks, unchanged (the test
checks that), run with plain ``python`` in separate processes under
``asyncio.run``, as a user would run them.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# The File Transfer Guide, kept verbatim in the docs (the contract we build to).
GUIDE = ROOT / "docs" / "file-transfer-guide.rst"
GUIDE_PORT = 8080


def _guide_blocks() -> list[str]:
    text = GUIDE.read_text()
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text)
    return [textwrap.dedent(block).strip("\n") for block in blocks]


def _normalise(code: str) -> str:
    # Whitespace-only lines are the one liberty taken (ruff strips them).
    return "\n".join(line.rstrip() for line in code.strip("\n").splitlines())


@pytest.mark.parametrize("name", ["file_server.py", "file_client.py"])
def test_examples_are_the_guide_verbatim(name: str) -> None:
    blocks = {_normalise(block) for block in _guide_blocks()}
    assert _normalise((EXAMPLES / name).read_text()) in blocks


def _wait_for_port(port: int, process: subprocess.Popen[str], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.communicate()}")
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"server did not listen on {port} in time")


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize(
    ("server_script", "client_script"),
    [
        ("file_server.py", "file_client.py"),  # the guide's pair, under asyncio
        ("file_server_trio.py", "file_client_trio.py"),  # the same, natively in Trio
        ("file_server_trio.py", "file_client.py"),  # and across the two worlds
        ("file_server.py", "file_client_trio.py"),
    ],
)
def test_guide_server_and_client_programs(
    server_script: str, client_script: str, tmp_path: Path
) -> None:
    assert _port_is_free(GUIDE_PORT), (
        f"the guide's example hard-codes port {GUIDE_PORT}, which something else is using"
    )
    document = os.urandom(3 * 1024 * 1024 + 123)
    (tmp_path / "my_document.pdf").write_bytes(document)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLES / server_script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_port(GUIDE_PORT, server, time.monotonic() + 30)
        client = subprocess.run(
            [sys.executable, str(EXAMPLES / client_script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr
        assert "100.0%" in client.stdout
        assert "Uploaded: {'success': True" in client.stdout
        received = tmp_path / "server_files" / "my_document.pdf"
        assert hashlib.sha256(received.read_bytes()).digest() == hashlib.sha256(document).digest()
        # Ctrl-C stops asyncio.run(server.run()) promptly.
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=15)
        assert f"Received my_document.pdf ({len(document)} bytes)" in out
        assert "Traceback" not in err or "KeyboardInterrupt" in err
        # No partial or hidden files left behind.
        assert sorted(p.name for p in received.parent.iterdir()) == ["my_document.pdf"]
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=10)


def test_push_to_client_example(tmp_path: Path) -> None:
    report = os.urandom(500_000)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "monthly.pdf").write_bytes(report)
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "push_to_client.py"), "server"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_port(8081, server, time.monotonic() + 30)
        client = subprocess.run(
            [sys.executable, str(EXAMPLES / "push_to_client.py"), "client"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr
        assert "got monthly.pdf (500000 bytes" in client.stdout
        assert (tmp_path / "inbox" / "monthly.pdf").read_bytes() == report
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.communicate(timeout=15)
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate(timeout=10)


def test_rpc_example(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "rpc_example.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "server asks: 2 x tea?" in result.stdout
    assert "{'success': True, 'data': {'accepted': True, 'client': " in result.stdout
    assert "chat: alice: hello everyone" in result.stdout


def test_the_pytest_trio_example_passes(tmp_path: Path) -> None:
    # As a user runs it: its own directory, no configuration of ours.
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(tmp_path / "pytest.ini"),
            "--rootdir",
            str(tmp_path),
            str(EXAMPLES / "test_app_with_pytest_trio.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout, result.stdout
