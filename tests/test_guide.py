"""Every snippet of the File Transfer Guide, executed as written, under Trio and asyncio.

The snippets are read from ``docs/file-transfer-guide.rst`` (the guide kept
verbatim) and compiled with top-level ``await`` allowed, so the text that runs
is exactly the text users read. The test only supplies what the guide leaves to
the reader: the files it names, a running server, and a ``client_id``.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import os
import re
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from conduit import Server

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "file-transfer-guide.rst"


def _sections() -> dict[str, list[str]]:
    """Code blocks by the title of the section they appear in."""
    sections: dict[str, list[str]] = {}
    title = ""
    lines = GUIDE.read_text().splitlines(keepends=True)
    text = "".join(lines)
    for match in re.finditer(
        r"^(?P<title>[^\n]+)\n[-=]{3,}\n|\.\. code-block:: python\n\n(?P<code>(?:    .*\n|\s*\n)+)",
        text,
        re.MULTILINE,
    ):
        if match.group("title"):
            title = match.group("title").strip()
        else:
            sections.setdefault(title, []).append(textwrap.dedent(match.group("code")))
    return sections


SECTIONS = _sections()


def _run_snippet(code: str, namespace: dict[str, Any]) -> Awaitable[Any] | None:
    """Execute ``code`` in ``namespace``; return the coroutine if it awaits at top level."""
    compiled = compile(code, str(GUIDE), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(compiled, namespace)
    return result if asyncio.iscoroutine(result) else None


def test_the_guide_has_the_sections_this_test_runs() -> None:
    expected = {
        "Setup",
        "Server Receiving Files",
        "Client Sending Files",
        "Server Sending Files",
        "Client Receiving Files",
        "Progress Tracking",
        "List Available Files",
        "Complete Example",
    }
    assert expected <= set(SECTIONS)


async def _scenario(start_server: Callable[[Server], Awaitable[None]], workdir: Path) -> None:
    os.chdir(workdir)
    # --- Setup: creating a handler touches nothing on disk.
    setup_ns: dict[str, Any] = {}
    assert _run_snippet(SECTIONS["Setup"][0], setup_ns) is None
    assert not (workdir / "files").exists()

    # --- Server Receiving Files
    server_ns: dict[str, Any] = {}
    _run_snippet(SECTIONS["Server Receiving Files"][0], server_ns)
    server: Server = server_ns["server"]
    await start_server(server)

    # --- Client Sending Files
    payload = os.urandom(300_000)
    Path("large_file.zip").write_bytes(payload)
    client_ns: dict[str, Any] = {}
    _run_snippet(SECTIONS["Client Sending Files"][0], client_ns)
    await client_ns["upload_file"]()
    client = client_ns["client"]
    assert hashlib.sha256((workdir / "uploads" / "large_file.zip").read_bytes()).digest() == (
        hashlib.sha256(payload).digest()
    )

    # --- Client Receiving Files (registers the client's handlers, then downloads)
    report = os.urandom(70_000)
    (workdir / "uploads" / "report.pdf").write_bytes(report)
    coroutine = _run_snippet(SECTIONS["Client Receiving Files"][0], client_ns)
    assert coroutine is not None
    await coroutine
    assert client_ns["result"]["success"] is True
    assert (workdir / "downloads" / "report.pdf").read_bytes() == report

    # --- Server Sending Files (push to the client that just connected)
    monthly = os.urandom(200_000)
    (workdir / "reports").mkdir()
    (workdir / "reports" / "monthly.pdf").write_bytes(monthly)
    server_ns["client_id"] = client.id
    coroutine = _run_snippet(SECTIONS["Server Sending Files"][0], server_ns)
    assert coroutine is not None
    await coroutine
    assert server_ns["result"]["success"] is True
    # The client's FileTransferHandler() stores pushes in its default directory.
    assert (workdir / "transfers" / "monthly.pdf").read_bytes() == monthly

    # --- Progress Tracking: the guide's callback on a real upload
    _run_snippet(SECTIONS["Progress Tracking"][0], client_ns)
    result = await client_ns["transfer"].send_to_server(
        client, "large_file.zip", on_progress=client_ns["on_progress"]
    )
    assert result["success"] is True
    # The same bytes under the same name were uploaded above: a re-run stores
    # no second copy (issue 13).
    assert result["skipped"] is True and result["reason"] == "already_there"

    # --- List Available Files
    coroutine = _run_snippet(SECTIONS["List Available Files"][0], client_ns)
    assert coroutine is not None
    await coroutine
    names = {entry["name"] for entry in client_ns["result"]["data"]["files"]}
    assert {"large_file.zip", "report.pdf"} <= names
    assert "large_file (1).zip" not in names

    await client.disconnect()
    await server.close()


def _check_output(output: str) -> None:
    assert "Received: " in output and "Size: 300000 bytes" in output
    assert "Uploaded to: large_file.zip" in output
    assert "Downloaded: " in output
    assert "100.0%" in output
    assert "File: large_file.zip" in output
    assert "Transferred: 300000 / 300000" in output
    assert "ETA: 0.0 seconds" in output
    assert "large_file.zip - 300000 bytes" in output


@pytest.fixture
def workdir(tmp_path: Path) -> Any:
    previous = Path.cwd()
    yield tmp_path
    os.chdir(previous)


def test_guide_under_trio(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def start(server: Server) -> None:
                await nursery.start(server.run)

            with trio.fail_after(60):
                await _scenario(start, workdir)

    trio.run(main)
    _check_output(capsys.readouterr().out)


def test_guide_under_asyncio(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        tasks: list[asyncio.Task[None]] = []

        async def start(server: Server) -> None:
            tasks.append(asyncio.create_task(server.run()))
            for _ in range(500):  # bounded: 5 s
                if server.is_running:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("server did not start")

        await asyncio.wait_for(_scenario(start, workdir), 60)
        await asyncio.wait_for(tasks[0], 10)

    asyncio.run(main())
    _check_output(capsys.readouterr().out)
