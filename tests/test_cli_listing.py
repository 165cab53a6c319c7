"""``conduit ls`` and ``conduit get DIR`` against listings, and ``conduit send ..``.

A server lists at most ``max_listed`` files in one answer. ``list_files``
says when it had more (``FileListing.truncated``) and where the next page
starts (``FileListing.next``); ``ls`` and a directory's download go page
after page; against a server that does not page (one of before
2026-12-07), ``ls`` reports a cut listing and exits 1, and a directory
whose own listing is cut fails instead of passing for complete. ``get
DIR`` plans from DIR's own listing, never the server's whole one. ``get``
also takes a directory by any spelling (``./photos``, ``photos//sub``,
``photos/``) and an empty one, and ``send ..`` names the tree after the
directory ``..`` is.

The cut-listing cases need a small ``max_listed``, which ``conduit serve``
does not offer: the server runs in this process (``server_factory``, real
loopback socket, real files) and the command in a subprocess
(:func:`trio.run_process`), each wait bounded by :func:`trio.fail_after`.
The other cases run ``conduit serve`` as in ``test_cli.py``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from rich.console import Console

from conduit import Client, FileTransferHandler, Server
from conduit.cli._display import FileJob, LiveDisplay, summary_line
from conduit.cli._transfer import collect_uploads
from conduit.transfer import FileListing
from conduit.transfer._batch_serve import BatchServer
from conduit.transfer._sender import Sender
from conftest import PASSWORD, ClientFactory, ServerFactory
from test_cli import (
    ServeProcess,
    conduit,
    conduit_json,
    server,  # noqa: F401 (the fixture)
    visible_files,
)

#: The in-process server's listing limit: small, so that a few files exceed it.
MAX_LISTED = 3
#: Seconds one command may take (a Python start and a handshake, a few files).
RUN_TIMEOUT = 60


def _env() -> dict[str, str]:
    """This environment, the password in ``CONDUIT_PASSWORD``, nothing that changes the output."""
    scrubbed = ("CONDUIT_ADDRESS", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    env = {k: v for k, v in os.environ.items() if k not in scrubbed}
    env["CONDUIT_PASSWORD"] = PASSWORD
    return env


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


async def _served(
    tmp_path: Path, server_factory: ServerFactory, files: dict[str, bytes], *, paging: bool = True
) -> Server:
    """A server in this process with ``max_listed=MAX_LISTED``, storing ``files``
    (``paging=False``: its ``file_list`` answers as before 2026-12-07, no ``next``)."""
    directory = tmp_path / "served"
    _tree(directory, files)
    handler = FileTransferHandler(storage_dir=directory, max_listed=MAX_LISTED)

    def register(serving: Server) -> None:
        handler.register_server_handlers(serving)
        if not paging:
            serving.register_rpc(_file_list_without_pages(directory), "file_list")

    return await server_factory(register=register)


def _file_list_without_pages(directory: Path) -> Callable[..., Any]:
    """``file_list`` as a server that does not page answers: the first
    ``MAX_LISTED`` files and ``truncated``, never a ``next``."""

    async def file_list(prefix: str = "") -> dict[str, Any]:
        below = directory / prefix if prefix else directory
        paths = sorted(path for path in below.rglob("*") if path.is_file())
        files = [
            {
                "name": path.relative_to(directory).as_posix(),
                "size": path.stat().st_size,
                "modified": path.stat().st_mtime,
            }
            for path in paths
        ]
        answer: dict[str, Any] = {"files": files[:MAX_LISTED]}
        if len(files) > MAX_LISTED:
            answer["truncated"] = True
        return answer

    return file_list


async def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """``python -m conduit ARGS`` in a subprocess, while this process's server serves it."""
    with trio.fail_after(RUN_TIMEOUT):
        return await trio.run_process(
            [sys.executable, "-m", "conduit", *args],
            stdin=b"",  # not a terminal: plain lines, no prompt
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=_env(),
            cwd=cwd,
        )


def _document(result: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    try:
        document: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"not one JSON document: {result.stdout!r} {result.stderr!r}"
        ) from None
    return document


# --------------------------------------------------------------------------- list_files


async def test_list_files_says_when_the_server_cut_it(
    tmp_path: Path, server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    files = {f"f{i}.txt": b"x" * i for i in range(1, 6)} | {"d/a.txt": b"a", "d/b.txt": b"b"}
    serving = await _served(tmp_path, server_factory, files)
    client: Client = await client_factory(serving)
    handler = FileTransferHandler()
    with trio.fail_after(10):
        everything = await handler.list_files(client)
        directory = await handler.list_files(client, prefix="d")
        nothing = await handler.list_files(client, prefix="missing")
    assert isinstance(everything, FileListing) and isinstance(everything, list)
    assert everything.truncated is True and len(everything) == MAX_LISTED
    # The first files by name, and where the rest starts.
    assert [entry["name"] for entry in everything] == sorted(files)[:MAX_LISTED]
    assert everything.next == everything[-1]["name"]
    pages = [everything]
    with trio.fail_after(10):
        while pages[-1].next is not None:
            pages.append(await handler.list_files(client, after=pages[-1].next))
    assert [entry["name"] for page in pages for entry in page] == sorted(files)
    assert [page.truncated for page in pages] == [True, True, False]
    assert directory.truncated is False and directory.next is None
    # Still a list to every caller written for one: equal to a plain list, sortable.
    assert directory == [dict(entry) for entry in directory]
    assert [entry["name"] for entry in sorted(directory, key=lambda e: e["name"])] == [
        "d/a.txt",
        "d/b.txt",
    ]
    assert nothing == [] and nothing.truncated is False


# --------------------------------------------------------------------------- ls


async def test_ls_goes_page_after_page(tmp_path: Path, server_factory: ServerFactory) -> None:
    """Until 2026-12-07 ``ls`` showed the first ``max_listed`` files and exited 1."""
    files = {f"f{i}.txt": b"%d" % i for i in range(1, 10)}
    serving = await _served(tmp_path, server_factory, files)
    result = await _run("ls", "--json", "--from", f"127.0.0.1:{serving.port}")
    assert result.returncode == 0, result
    document = _document(result)
    assert document["truncated"] is False and document["ok"] is True, document
    assert [entry["name"] for entry in document["files"]] == sorted(files)


async def test_ls_says_the_listing_was_cut(tmp_path: Path, server_factory: ServerFactory) -> None:
    """By a server that does not page."""
    serving = await _served(
        tmp_path, server_factory, {f"f{i}.txt": b"%d" % i for i in range(1, 10)}, paging=False
    )
    address = f"127.0.0.1:{serving.port}"

    plain = await _run("ls", "--from", address)
    assert plain.returncode == 1, plain
    out = plain.stdout.decode()
    assert out.count(".txt") == MAX_LISTED, out
    assert "truncated" in out, out
    assert "listed only part of its files" in plain.stderr.decode(), plain.stderr

    as_json = await _run("ls", "--json", "--from", address)
    assert as_json.returncode == 1, as_json
    document = _document(as_json)
    assert document["truncated"] is True and document["ok"] is False, document
    assert len(document["files"]) == MAX_LISTED


async def test_ls_of_a_complete_listing_is_not_truncated(
    tmp_path: Path, server_factory: ServerFactory
) -> None:
    serving = await _served(tmp_path, server_factory, {"a.txt": b"a", "b.txt": b"b"})
    result = await _run("ls", "--json", "--from", f"127.0.0.1:{serving.port}")
    assert result.returncode == 0, result
    document = _document(result)
    assert document["truncated"] is False and document["ok"] is True, document
    assert [entry["name"] for entry in document["files"]] == ["a.txt", "b.txt"]


# --------------------------------------------------------------------------- get DIR


async def test_get_dir_is_planned_from_its_own_listing(
    tmp_path: Path, server_factory: ServerFactory
) -> None:
    # "aaa" fills the server's whole (cut) listing; "zdir" is not in it at all.
    files = {f"aaa/f{i}.txt": b"a%d" % i for i in range(1, 5)}
    files |= {"zdir/f1.txt": b"z1", "zdir/f2.txt": b"z2"}
    serving = await _served(tmp_path, server_factory, files)
    out = tmp_path / "out"
    result = await _run(
        "get", "zdir", "--json", "-o", str(out), "--from", f"127.0.0.1:{serving.port}"
    )
    assert result.returncode == 0, result
    document = _document(result)
    assert [entry["name"] for entry in document["files"]] == ["zdir/f1.txt", "zdir/f2.txt"]
    assert visible_files(out) == {"zdir/f1.txt": b"z1", "zdir/f2.txt": b"z2"}


async def test_get_dir_brings_small_files_many_per_call(
    tmp_path: Path, server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {f"zdir/f{i:03d}.txt": b"z%d" % i for i in range(100)}
    files["zdir/big.bin"] = os.urandom(300 * 1024)  # over the small-file limit: alone
    directory = tmp_path / "served"
    _tree(directory, files)
    handler = FileTransferHandler(storage_dir=directory)
    serving = await server_factory(register=handler.register_server_handlers)
    calls: list[str] = []
    batch_serve, start_download = BatchServer.serve, Sender._start_download

    async def counted_batch(self: BatchServer, wanted: Any) -> Any:
        calls.append("batch")
        return await batch_serve(self, wanted)

    async def counted_download(self: Sender, *args: Any) -> Any:
        calls.append("download")
        return await start_download(self, *args)

    monkeypatch.setattr(BatchServer, "serve", counted_batch)
    monkeypatch.setattr(Sender, "_start_download", counted_download)
    out = tmp_path / "out"
    address = f"127.0.0.1:{serving.port}"
    result = await _run("get", "zdir", "--json", "-o", str(out), "--from", address)
    assert result.returncode == 0, result
    document = _document(result)
    assert len(document["files"]) == len(files) and document["ok"] is True, document
    assert visible_files(out) == files
    assert all(Path(entry["path"]).is_file() for entry in document["files"]), document
    # 100 files in two groups of 64 and 36 (a call each), the big one alone.
    assert calls.count("download") == 1 and 2 <= calls.count("batch") <= 4, calls
    calls.clear()
    again = await _run("get", "zdir", "--json", "-o", str(out), "--from", address)
    assert again.returncode == 0, again
    skipped = [entry.get("reason") for entry in _document(again)["files"]]
    assert skipped == ["already_there"] * len(files), skipped
    assert visible_files(out) == files


async def test_more_jobs_than_the_server_takes_move_every_file(
    tmp_path: Path, server_factory: ServerFactory
) -> None:
    """``-j 16`` against two transfer slots per connection: each job over the
    limit waits for one to end (it was refused ``overloaded`` and failed)."""
    files = {f"jdir/big{i:02d}.bin": os.urandom(200 * 1024 + i) for i in range(12)}
    files.update({f"jdir/small{i:03d}.txt": b"s%d" % i for i in range(150)})
    _tree(tmp_path / "mine", files)
    handler = FileTransferHandler(storage_dir=tmp_path / "served")
    handler.max_transfers_per_connection = 2
    serving = await server_factory(register=handler.register_server_handlers)
    address = f"127.0.0.1:{serving.port}"
    sent = await _run(
        "send", str(tmp_path / "mine" / "jdir"), "-j", "16", "--json", "--to", address
    )
    assert sent.returncode == 0 and _document(sent)["ok"] is True, _document(sent)
    assert visible_files(tmp_path / "served") == files
    out = tmp_path / "out"
    got = await _run("get", "jdir", "-j", "16", "--json", "-o", str(out), "--from", address)
    failed = [entry for entry in _document(got)["files"] if not entry["success"]]
    assert got.returncode == 0 and failed == [], failed
    assert visible_files(out) == files


async def test_get_dir_goes_page_after_page(tmp_path: Path, server_factory: ServerFactory) -> None:
    """Until 2026-12-07 a directory of more files than ``max_listed`` failed
    (``truncated``) with only those listed received."""
    files = {f"zdir/f{i}.txt": b"z%d" % i for i in range(1, 9)} | {"zdir/sub/a": b"a"}
    serving = await _served(tmp_path, server_factory, files)
    out = tmp_path / "out"
    address = f"127.0.0.1:{serving.port}"
    result = await _run("get", "zdir", "--json", "-o", str(out), "--from", address)
    assert result.returncode == 0, result
    document = _document(result)
    assert document["ok"] is True, document
    assert sorted(entry["name"] for entry in document["files"]) == sorted(files)
    assert visible_files(out) == files


async def test_get_dir_with_a_cut_listing_fails_instead_of_passing_for_complete(
    tmp_path: Path, server_factory: ServerFactory
) -> None:
    """A server that does not page cut the directory's listing."""
    files = {f"zdir/f{i}.txt": b"z%d" % i for i in range(1, 6)}
    serving = await _served(tmp_path, server_factory, files, paging=False)
    address = f"127.0.0.1:{serving.port}"

    out = tmp_path / "out"
    result = await _run("get", "zdir", "--json", "-o", str(out), "--from", address)
    assert result.returncode == 1, result
    document = _document(result)
    assert document["ok"] is False
    by_name = {entry["name"]: entry for entry in document["files"]}
    cut = by_name.pop("zdir")
    assert cut["success"] is False and cut["code"] == "truncated", cut
    assert "only 3 files of this directory were listed" in cut["error"], cut
    # What was listed did arrive, and is reported file by file.
    assert len(by_name) == MAX_LISTED and all(e["success"] for e in by_name.values())
    assert len(visible_files(out)) == MAX_LISTED

    plain = await _run("get", "zdir", "-o", str(tmp_path / "out2"), "--from", address)
    assert plain.returncode == 1, plain
    assert "FAILED    zdir: only 3 files of this directory were listed" in plain.stdout.decode()


@pytest.mark.parametrize("spelling", ["./photos", "photos/", "photos//sub", "./photos/sub/"])
def test_get_dir_in_any_spelling(
    tmp_path: Path,
    server: ServeProcess,  # noqa: F811
    spelling: str,
) -> None:
    _tree(server.directory, {"photos/a.txt": b"a", "photos/sub/b.txt": b"b"})
    out = tmp_path / "out"
    code, document = conduit_json("get", spelling, "-o", str(out), "--from", server.address)
    assert code == 0, document
    wanted = {"photos/sub/b.txt": b"b"}
    if "sub" not in spelling:
        wanted["photos/a.txt"] = b"a"
    assert visible_files(out) == wanted
    assert sorted(entry["name"] for entry in document["files"]) == sorted(wanted)
    assert all(Path(entry["path"]).is_file() for entry in document["files"]), document


def test_get_an_empty_directory(tmp_path: Path, server: ServeProcess) -> None:  # noqa: F811
    (server.directory / "empty").mkdir(parents=True)
    code, document = conduit_json("get", "empty", "-o", str(tmp_path), "--from", server.address)
    assert code == 0 and document["ok"] is True and document["files"] == [], document
    result = conduit("get", "empty", "-o", str(tmp_path), "--from", server.address)
    assert result.returncode == 0 and "0 of 0 files received" in result.stdout, result
    assert "Traceback" not in result.stderr, result.stderr


def test_live_display_shows_a_directory_jobs_files() -> None:
    # A download by name that turned out to be a directory: one line per file.
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160)
    other = FileJob(name="other.bin", local=None, size=10)
    tree = FileJob(name="zdir", local=None, size=None)
    with LiveDisplay("get", console, [other, tree]) as display:
        display.file_started(tree)
        tree.result = {"success": False, "error": "cut", "code": "truncated", "files": []}
        tree.parts = [
            FileJob("zdir/a.txt", "out/zdir/a.txt", 2, {"success": True, "size": 2}),
            FileJob("zdir", None, None, {"success": False, "error": "cut", "code": "truncated"}),
        ]
        display.file_finished(tree)
    text = buffer.getvalue()
    assert "received  zdir/a.txt -> out/zdir/a.txt" in text, text
    assert "FAILED    zdir: cut [truncated]" in text, text
    assert summary_line("get", [tree], 1.0, False).startswith("1 of 2 files received")


# --------------------------------------------------------------------------- send ..


def test_send_dotdot_uses_the_parent_directory_name(
    tmp_path: Path,
    server: ServeProcess,  # noqa: F811
) -> None:
    project = tmp_path / "proj"
    _tree(project, {"a.txt": b"hello", "sub/b.txt": b"world"})
    result = conduit("send", "..", "--to", server.address, cwd=project / "sub")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert visible_files(server.directory) == {"proj/a.txt": b"hello", "proj/sub/b.txt": b"world"}


@pytest.mark.parametrize(("where", "given"), [("sub", ".."), ("sub", "."), ("", "sub/..")])
def test_collect_uploads_names_dot_and_dotdot_by_what_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, given: str
) -> None:
    project = tmp_path / "proj"
    _tree(project, {"sub/b.txt": b"b"})
    monkeypatch.chdir(project / where)
    jobs, skipped = collect_uploads([Path(given)])
    top = "sub" if given == "." else "proj"
    assert not skipped
    assert [job.name for job in jobs] == ([f"{top}/sub/b.txt"] if top == "proj" else ["sub/b.txt"])
    assert all(os.path.isfile(str(job.local)) for job in jobs)


def test_a_tree_deeper_than_the_systems_path_limit_is_a_failed_entry_not_a_traceback(
    tmp_path: Path,
) -> None:
    """A subdirectory whose path passes PATH_MAX (made through descriptors, as
    an archive can unpack it) cannot be looked at by its path: its subtree is
    listed as failed and the rest is sent. Until 2026-12-07 the error
    (``File name too long``) ended ``conduit send`` with a traceback, nothing
    sent (found by a review of directory transfers at scale)."""
    top = tmp_path / "tree"
    _tree(top, {"ok/a.txt": b"a"})
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(5000 // 250):
            os.mkdir("d" * 250, dir_fd=fd)
            inner = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        written = os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.close(written)
    finally:
        os.close(fd)
    jobs, skipped = collect_uploads([top])
    assert [job.name for job in jobs] == ["tree/ok/a.txt"]
    assert len(skipped) == 1 and skipped[0].failed, skipped
    assert skipped[0].reason == "cannot read: File name too long", skipped
    assert len(skipped[0].local) > 4096


def test_ls_shows_a_time_no_date_can_hold_as_unknown() -> None:
    """A listed time past the year 9999 (a tmpfs allows it; a server could
    send anything) ended ``ls`` with a traceback (``ValueError: year 10000 is
    out of range``). Found by a review of the CLI; ``--json`` gives it as it came."""
    from conduit.cli._transfer import _listed_time

    assert _listed_time({"modified": 253402300800.0}) == "????-??-?? ??:??"
    assert _listed_time({"modified": "soon"}) == "????-??-?? ??:??"
    assert _listed_time({"modified": float("nan")}) == "????-??-?? ??:??"
    assert len(_listed_time({"modified": 1_700_000_000.0})) == 16
