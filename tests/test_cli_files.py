"""``conduit`` commands for managing and re-sending files, run as a user runs them.

Re-runs of ``send`` and ``get`` that must not store copies, ``rm`` and ``mv``,
and the one-line messages of expected failures (a port in use, a TLS server
spoken to in plain text). Real subprocesses, helpers from ``test_cli.py``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from conduit import Client, ClientDescriptor, FileTransferHandler, Server
from conduit.cli._common import ExitCode, Signals, error_line, printable
from conduit.cli._display import FileJob, outcome_line
from conduit.cli._transfer import _cut_short, _exit_code, _outcome, _plan_name
from conftest import ClientFactory, ServerFactory
from test_cli import (
    PASSWORD,
    ServeProcess,
    conduit,
    conduit_json,
    partial_files,
    server,  # noqa: F401 (the fixture)
    start_server,
    visible_files,
    write_random,
)


def _batch(root: Path) -> Path:
    batch = root / "batch"
    (batch / "sub").mkdir(parents=True)
    (batch / "small1.bin").write_bytes(b"one" * 100)
    (batch / "sub" / "small2.bin").write_bytes(b"two" * 100)
    write_random(batch / "big.bin", 3 * 1024 * 1024 + 5)
    return batch


def test_send_batch_rerun_stores_no_copies(tmp_path: Path, server: ServeProcess) -> None:  # noqa: F811
    batch = _batch(tmp_path)
    assert conduit("send", str(batch), "--to", server.address).returncode == 0
    first = visible_files(server.directory)
    assert sorted(first) == ["batch/big.bin", "batch/small1.bin", "batch/sub/small2.bin"]

    code, again = conduit_json("send", str(batch), "--to", server.address)
    assert code == 0, again
    assert visible_files(server.directory) == first  # no "small1 (1).bin"
    for entry in again["files"]:
        assert entry["success"] is True and entry["skipped"] is True, entry
        assert entry["reason"] == "already_there"

    # A genuinely different file under a taken name still gets "name (1)".
    (batch / "small1.bin").write_bytes(b"ONE" * 100)
    assert conduit("send", str(batch), "--to", server.address).returncode == 0
    after = visible_files(server.directory)
    assert after["batch/small1 (1).bin"] == b"ONE" * 100
    assert after["batch/small1.bin"] == b"one" * 100
    assert len(after) == 4
    # ... and running it once more finds that copy: still four files.
    assert conduit("send", str(batch), "--to", server.address).returncode == 0
    assert visible_files(server.directory) == after
    assert not partial_files(server.directory)


def test_get_rerun_stores_no_copies(tmp_path: Path, server: ServeProcess) -> None:  # noqa: F811
    batch = _batch(server.directory)
    out = tmp_path / "out"
    for _attempt in range(3):
        code, document = conduit_json("get", "batch", "-o", str(out), "--from", server.address)
        assert code == 0, document
    assert visible_files(out) == {
        "batch/" + name: data for name, data in visible_files(batch).items()
    }
    assert all(entry["skipped"] is True for entry in document["files"]), document


def test_serve_on_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = conduit("serve", str(tmp_path / "d"), "--port", str(port), timeout=30)
    assert result.returncode == 4, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
    # Nothing made either: the storage directory is created once the server
    # listens (it was left behind until 2026-12-07).
    assert not (tmp_path / "d").exists()


def test_plain_client_to_a_tls_server_says_use_tls(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    cert_file = tmp_path / "server.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(cert_file)
    )
    serving = start_server(tmp_path, "--tls-cert", str(cert_file))
    try:
        result = conduit("ls", "--from", serving.address, timeout=30)
    finally:
        serving.stop()
    assert result.returncode == 4, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "the server speaks TLS; use --tls" in lines[0], result.stderr


def test_tls_client_to_a_plain_server_says_connect_without_tls(
    server: ServeProcess,  # noqa: F811
) -> None:
    result = conduit("ls", "--from", server.address, "--tls", timeout=30)
    assert result.returncode == 4, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "the server does not speak TLS" in lines[0], result.stderr
    assert "connect without --tls" in lines[0], result.stderr


def test_rm_and_mv(tmp_path: Path, server: ServeProcess) -> None:  # noqa: F811
    write_random(server.directory / "a.bin", 10)
    write_random(server.directory / "b.bin", 20)
    (server.directory / "d").mkdir()
    address = ("--from", server.address)

    result = conduit("mv", "a.bin", "b.bin", *address)
    assert result.returncode == 1, result.stderr
    assert "FAILED" in result.stdout and "[exists]" in result.stdout

    result = conduit("mv", "a.bin", "sub/c.bin", *address)
    assert result.returncode == 0, result.stderr
    assert "renamed   a.bin -> sub/c.bin" in result.stdout
    assert sorted(visible_files(server.directory)) == ["b.bin", "sub/c.bin"]

    code, document = conduit_json("mv", "sub/c.bin", "b.bin", "--overwrite", *address)
    assert code == 0 and document["ok"] is True, document
    (entry,) = document["files"]
    assert (entry["name"], entry["new_name"], entry["path"]) == ("sub/c.bin", "b.bin", "b.bin")
    assert len(visible_files(server.directory)["b.bin"]) == 10

    code, document = conduit_json("rm", "b.bin", "missing.bin", "d", "../x", *address)
    assert code == 1, document
    assert [entry["success"] for entry in document["files"]] == [True, False, False, False]
    # Each entry says which name it is about, as asked.
    assert [entry["name"] for entry in document["files"]] == ["b.bin", "missing.bin", "d", "../x"]
    assert [entry.get("code") for entry in document["files"][1:]] == [
        "not_found",
        "unsafe_path",
        "unsafe_path",
    ]
    assert visible_files(server.directory) == {}
    assert conduit("rm", *address).returncode == 2  # NAME is required


def test_printed_paths_are_normalised(tmp_path: Path, server: ServeProcess) -> None:  # noqa: F811
    write_random(server.directory / "big.bin", 300 * 1024)
    here = tmp_path / "client"
    here.mkdir()
    result = conduit("get", "big.bin", "-o", "../dl", "--from", server.address, cwd=here)
    assert result.returncode == 0, result.stderr
    assert "/../" not in result.stdout and "client/.." not in result.stdout, result.stdout
    assert str(tmp_path / "dl" / "big.bin") in result.stdout
    again = conduit("get", "big.bin", "-o", "../dl", "--from", server.address, cwd=here)
    assert again.returncode == 0 and "already there" in again.stdout, again.stdout
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["big.bin"]


def test_send_many_small_files_each_reported(tmp_path: Path, server: ServeProcess) -> None:  # noqa: F811
    # 70 small files (two batch calls) and one streamed file, named one by one.
    outbox = tmp_path / "many"
    outbox.mkdir()
    sources = []
    for index in range(70):
        path = outbox / f"n{index:02d}.txt"
        path.write_bytes(b"note %d" % index)
        sources.append(str(path))
    write_random(outbox / "large.bin", 200 * 1024)
    sources.append(str(outbox / "large.bin"))
    code, sent = conduit_json("send", *sources, "--to", server.address)
    assert code == 0, sent
    assert len(sent["files"]) == 71
    assert all(entry["success"] is True for entry in sent["files"]), sent
    stored = visible_files(server.directory)
    assert sorted(stored) == sorted(Path(source).name for source in sources)
    assert stored["n07.txt"] == b"note 7"
    assert not partial_files(server.directory)


def test_failed_downloads_are_logged_under_a_budget(server: ServeProcess) -> None:  # noqa: F811
    """A client that asks again and again for a name that is not there gets
    a failure each time; the server logs the first five, then holds the rest
    back (one line per 10 s says how many), as for the library's own lines a
    peer causes at will."""

    async def ask_for_missing_files() -> list[dict[str, Any]]:
        client = Client(
            ClientDescriptor(server_host="127.0.0.1", server_port=server.port, password=PASSWORD)
        )
        async with client:
            # The protocol's own call (a download's first step; the
            # handler's receive_from_server looks first and stops there).
            return [
                await client.rpc.call(
                    "file_download",
                    name=f"missing-{index}.bin",
                    stream_id=2 * index + 1,
                    size=0,
                    offset=0,
                    prefix_sha256="",
                )
                for index in range(8)
            ]

    results = trio.run(ask_for_missing_files)
    assert [result["success"] for result in results] == [False] * 8, results
    # The hook logs before each answer is sent: every line there will be is there.
    failed = re.findall(r"download +'missing-\d\.bin' for .* failed", server.log_text())
    assert len(failed) == 5, server.log_text()


def test_empty_and_refused_names_fetch_and_send_nothing_else(
    tmp_path: Path,
    server: ServeProcess,  # noqa: F811
) -> None:
    """``get ""`` (an unset ``"$NAME"``) fetched every file of the server, as
    its listing with an empty prefix lists everything; ``send DIR --as ""``
    sent the directory's files into the server's root. Found by a review of
    the CLI. Now the first fails ``unsafe_path`` as ``.`` does, and the second
    is a usage error naming ``--as /``, which still sends into the root."""
    write_random(server.directory / "kept.bin", 10)
    fetched = conduit("get", "", "-o", str(tmp_path / "dl"), "--from", server.address)
    assert fetched.returncode == 1, fetched.stdout + fetched.stderr
    assert "[unsafe_path]" in fetched.stdout
    assert not (tmp_path / "dl").exists() or not list((tmp_path / "dl").iterdir())
    tree = tmp_path / "tree"
    tree.mkdir()
    write_random(tree / "t.bin", 10)
    refused = conduit("send", str(tree), "--as", "", "--to", server.address)
    assert refused.returncode == 2 and "--as /" in refused.stderr, refused.stderr
    assert sorted(visible_files(server.directory)) == ["kept.bin"]
    into_root = conduit("send", str(tree), "--as", "/", "--to", server.address)
    assert into_root.returncode == 0, into_root.stdout + into_root.stderr
    assert sorted(visible_files(server.directory)) == ["kept.bin", "t.bin"]
    # A file has no files to put into the root: a usage error, before
    # connecting (it connected and failed [unsafe_path], a review found).
    a_file = conduit("send", str(tree / "t.bin"), "--as", "/", "--to", "127.0.0.1:9")
    assert a_file.returncode == 2, a_file.stdout + a_file.stderr
    assert "is not a directory: give the file a name" in a_file.stderr, a_file.stderr


def test_a_special_file_named_to_send_fails_as_not_a_regular_file(
    tmp_path: Path,
    server: ServeProcess,  # noqa: F811
) -> None:
    """A FIFO named on the command line failed "is a directory" (the
    library's IsADirectoryError for anything but a regular file); found by a
    review of the CLI."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = conduit("send", str(fifo), "--to", server.address)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not a regular file" in result.stdout and "is a directory" not in result.stdout


def test_a_rerun_says_where_a_file_that_collided_is_stored(
    tmp_path: Path,
    server: ServeProcess,  # noqa: F811
) -> None:
    """Two files of one name are stored as ``same.txt`` and ``same (1).txt``;
    sent again, each is unchanged, and the second says where it is stored
    (its re-run line hid it: found by a review of the CLI)."""
    for folder, size in (("p", 10), ("q", 20)):
        (tmp_path / folder).mkdir()
        write_random(tmp_path / folder / "same.txt", size)
    sources = [str(tmp_path / "p" / "same.txt"), str(tmp_path / "q" / "same.txt")]
    first = conduit("send", *sources, "--to", server.address)
    assert first.returncode == 0 and "(stored as same (1).txt)" in first.stdout, first.stdout
    again = conduit("send", *sources, "--to", server.address)
    assert again.returncode == 0, again.stdout
    assert "stored as same (1).txt, not sent again" in again.stdout, again.stdout
    # The summary does not claim them sent (it said "2 of 2 files sent (30 B)").
    summary = again.stdout.strip().splitlines()[-1]
    assert summary.startswith("0 of 2 files sent (0 B), 2 unchanged in "), summary


async def test_get_plans_no_file_outside_the_name_a_server_lists(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """A server whose listing of ``photos`` names ``docs/important.txt``:
    ``conduit get photos`` plans no job for it (until 2026-12-07 it fetched
    it into the output directory, and replaced the user's own file there
    with ``--overwrite``); the name alone is left, whose download then says
    ``bad_answer``."""
    transfer = FileTransferHandler(storage_dir=tmp_path / "server")
    (tmp_path / "server" / "photos").mkdir(parents=True)

    def register(hostile: Server) -> None:
        transfer.register_server_handlers(hostile)

        async def file_list(prefix: str = "") -> dict[str, Any]:
            return {"files": [{"name": "docs/important.txt", "size": 4, "modified": 0.0}]}

        hostile.register_rpc(file_list, "file_list")

    client = await client_factory(await server_factory(register=register))
    with trio.fail_after(30):
        jobs = await _plan_name(FileTransferHandler(), client, "photos")
    assert jobs == [FileJob(name="photos", local=None, size=None)]


def test_what_the_server_says_reaches_the_terminal_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An error's text and code, and where a file was stored, are the server's:
    every character that is not printable is shown escaped, so an escape
    sequence can neither clear the screen nor retitle the window, and a
    newline cannot make up a line (until 2026-12-07 they went out raw)."""
    hostile = "\x1b[2J\x1b]0;PWNED\x07\nsent      fake.txt"
    failed = FileJob("a.txt", None, 1, {"success": False, "error": hostile, "code": hostile})
    stored = FileJob("b.txt", None, 1, {"success": True, "size": 1, "path": hostile})
    for job in (failed, stored):
        line = outcome_line("send", job)
        assert "\x1b" not in line and "\x07" not in line and "\n" not in line, line
        assert "\\x1b[2J\\x1b]0;PWNED\\x07\\nsent      fake.txt" in line, line
    assert not _outcome("deleted", "a.txt", {"success": False, "error": hostile, "code": "x"})
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and "\x1b" not in printed, printed
    assert printable("café ok") == "café ok"
    assert error_line("bad\u202etxt.exe") == "conduit: error: bad\\u202etxt.exe"


def test_entries_that_cannot_be_read_count_in_the_summary_and_print_escaped(
    tmp_path: Path,
    server: ServeProcess,  # noqa: F811
) -> None:
    """A tree with a file and a link that leads nowhere (which cannot be
    read), named with an escape sequence: the summary counts it as failed
    (it said "1 of 1 files sent" until 2026-12-07), and its FAILED line
    shows the name escaped, as every other line does (it went out raw)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok.txt").write_bytes(b"fine")
    (tree / "dang\x1b[31mRED").symlink_to(tmp_path / "nowhere")
    result = conduit("send", str(tree), "--to", server.address)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAILED") and "dang\\x1b[31mRED" in line for line in lines), lines
    assert "\x1b" not in result.stdout
    assert lines[-1].startswith("1 of 2 files sent") and lines[-1].endswith("; 1 failed"), lines


def test_a_signal_after_every_file_arrived_cuts_nothing() -> None:
    """A Ctrl-C that came once every file was there exited 130, beside a
    summary that said all were (a review, 2026-12-07): 0 now, and the JSON
    document says it was not interrupted. One that came before a file ended
    is still 130 (143 for SIGTERM); without a signal, a failure is 1."""
    done = [
        FileJob("a.bin", "a.bin", 1, {"success": True}),
        FileJob("b.bin", "b.bin", 1, {"success": True}),
    ]
    cut = [done[0], FileJob("c.bin", "c.bin", 1, {"success": False, "code": "connection_closed"})]
    interrupted = Signals()
    interrupted.received = signal.SIGINT
    terminated = Signals()
    terminated.received = signal.SIGTERM
    assert _exit_code(done, interrupted) == ExitCode.OK
    assert not _cut_short(done, interrupted, unread=False)
    assert _exit_code(cut, interrupted) == ExitCode.INTERRUPTED
    assert _exit_code(cut, terminated) == ExitCode.TERMINATED
    assert _cut_short(cut, interrupted, unread=False)
    assert _exit_code(done, interrupted, unread=True) == ExitCode.INTERRUPTED
    assert _exit_code(cut, Signals()) == ExitCode.TRANSFER_FAILED
