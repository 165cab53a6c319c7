"""Coming back after a transfer was cut or given up: resuming, re-running, cleaning up.

Real loopback sockets and real files, as in ``test_transfer.py``. Each test
pins down a defect a review found (the docstrings say what the library should
do):

* a cut download resumes when the disk has room for the rest, not the whole file;
* a resumed download, and a re-run's check of a complete local copy, wait
  for the server's hashing however long it takes (no RPC timeout);
* a sender that gives up after the receiver's begin answered, before the
  stream opened, tells the receiver, which gives back its transfer slot;
* a download that starts a new partial removes the idle partials that older
  versions of the same file left in the directory.

A slow disk is simulated by slowing the server's hash function down, a small
disk by patching :meth:`StorageRoot.free_space`. Every test bounds its body
with ``trio.fail_after``; none asserts on speed.
"""

from __future__ import annotations

import collections
import errno
import functools
import hashlib
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from conduit import Client, FileTransferHandler, Server, TransferProgress
from conduit.errors import RPCError
from conduit.transfer import _engine, _hashing, _sender, _storage
from conduit.transfer._names import partial_basename
from conduit.transfer._receiver import Receiver
from conduit.transfer._stoppable import Stopped
from conduit.transfer._storage import PartialFile, StorageRoot, sha256_of_fd
from conduit.transfer._wire import download_transfer_id, transfer_key
from conftest import ClientFactory, ServerFactory, open_descriptors, opened_since, wait_until
from transfer_helpers import (
    MiB,
    file_sha256,
    make_file,
    partial_files,
    storage_server,
    upload_partial_name,
    visible_files,
)

#: Big enough to stream (more than one chunk), small enough to be quick.
SIZE = 4 * MiB
#: What a planted partial holds: a cut at three quarters.
KEPT = 3 * MiB
#: The client's RPC timeout in the tests of slow hashing, and how long the
#: server's hash then takes: longer than the timeout, so a call that is still
#: bound by it fails.
SHORT_RPC_TIMEOUT = 0.5
SLOW_HASH_SECONDS = 1.0


def _plant_prefix(source: Path, partial: Path, length: int) -> None:
    """Write the first ``length`` bytes of ``source`` as the partial file ``partial``."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as file:
        partial.write_bytes(file.read(length))


async def plant_download_partial(served: Path, local_dir: Path, length: int) -> Path:
    """The partial a download of ``served`` cut after ``length`` bytes leaves in ``local_dir``."""
    info = served.stat()
    key = download_transfer_id(transfer_key(served.name, info.st_size, info.st_mtime_ns))
    partial = local_dir / partial_basename(served.name, key)
    await trio.to_thread.run_sync(_plant_prefix, served, partial, length)
    return partial


def limit_free_space(monkeypatch: pytest.MonkeyPatch, directory: Path, free: int) -> None:
    """Make :meth:`StorageRoot.free_space` report ``free`` bytes for ``directory`` only."""
    real_free_space = StorageRoot.free_space

    def free_space(self: StorageRoot) -> int:
        return free if self.path == directory else real_free_space(self)

    monkeypatch.setattr(StorageRoot, "free_space", free_space)


async def server_and_client(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    storage: Path,
    *,
    client_options: dict[str, Any] | None = None,
    **handler_options: Any,
) -> tuple[FileTransferHandler, Server, Client]:
    """A server storing under ``storage`` and a client connected to it."""
    handler, server = await storage_server(server_factory, storage, **handler_options)
    client = await client_factory(server, **(client_options or {}))
    return handler, server, client


# --------------------------------------------------------------------------- free space


async def assert_resumed(result: dict[str, Any], path: Path, checksum: str) -> None:
    """The transfer succeeded from the kept prefix and ``path`` holds the whole file."""
    assert result["success"] is True, result
    assert result["resumed_from"] == KEPT
    assert await file_sha256(path) == checksum


async def test_download_resumes_with_room_for_only_the_rest(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A download cut at 3 of 4 MiB resumes with 1.5 MiB free: only the missing
    bytes need room, not the whole file again."""
    with trio.fail_after(30):
        storage, local_dir = tmp_path / "server", tmp_path / "downloads"
        checksum = await make_file(storage / "big.bin", SIZE)
        await plant_download_partial(storage / "big.bin", local_dir, KEPT)
        limit_free_space(monkeypatch, local_dir, SIZE - KEPT + MiB // 2)
        _, _, client = await server_and_client(server_factory, client_factory, storage)
        receiver = FileTransferHandler(storage_dir=tmp_path / "client")

        result = await receiver.receive_from_server(client, "big.bin", local_dir=local_dir)

        await assert_resumed(result, local_dir / "big.bin", checksum)
        assert partial_files(local_dir) == []


async def test_download_refused_for_space_keeps_its_partial(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Too little room even for the rest: refused with what is really needed, and
    the partial stays, so that the download resumes once there is room."""
    with trio.fail_after(30):
        storage, local_dir = tmp_path / "server", tmp_path / "downloads"
        checksum = await make_file(storage / "big.bin", SIZE)
        partial = await plant_download_partial(storage / "big.bin", local_dir, KEPT)
        limit_free_space(monkeypatch, local_dir, (SIZE - KEPT) // 2)
        _, _, client = await server_and_client(server_factory, client_factory, storage)
        receiver = FileTransferHandler(storage_dir=tmp_path / "client")

        refused = await receiver.receive_from_server(client, "big.bin", local_dir=local_dir)

        assert refused["success"] is False, refused
        assert refused["code"] == "no_space", refused
        assert f"{SIZE - KEPT} bytes needed" in refused["error"], refused
        assert partial_files(local_dir) == [partial]
        assert partial.stat().st_size == KEPT

        monkeypatch.undo()  # room again
        retry = await receiver.receive_from_server(client, "big.bin", local_dir=local_dir)
        await assert_resumed(retry, local_dir / "big.bin", checksum)


async def test_download_refused_for_space_leaves_no_empty_partial(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A download with nothing to resume that does not fit leaves nothing behind
    (the partial is opened before the check now, to learn what it holds)."""
    with trio.fail_after(30):
        storage, local_dir = tmp_path / "server", tmp_path / "downloads"
        await make_file(storage / "big.bin", SIZE)
        limit_free_space(monkeypatch, local_dir, SIZE // 2)
        _, _, client = await server_and_client(server_factory, client_factory, storage)
        receiver = FileTransferHandler(storage_dir=tmp_path / "client")

        refused = await receiver.receive_from_server(client, "big.bin", local_dir=local_dir)

        assert refused["code"] == "no_space", refused
        assert partial_files(local_dir) == []


# --------------------------------------------------------------------------- slow hashing


@contextmanager
def slow_server_hashing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Slow down the server's hashing (a resume prefix, a whole file) like a slow disk.

    Patches the functions the serving side hashes with in its worker threads;
    the client's side (its own partial, its local copy) hashes elsewhere.
    """
    real_prefix = _engine._hash_prefix
    real_whole = sha256_of_fd  # what _hashing hashes a whole file with

    def slow_prefix(file: Any, length: int) -> Any:
        time.sleep(SLOW_HASH_SECONDS)
        return real_prefix(file, length)

    def slow_whole(fd: int, size: int) -> tuple[str, int]:
        time.sleep(SLOW_HASH_SECONDS)
        return real_whole(fd, size)

    with monkeypatch.context() as patch:
        patch.setattr(_engine, "_hash_prefix", slow_prefix)
        patch.setattr(_hashing, "sha256_of_fd", slow_whole)
        yield


async def test_download_resume_waits_for_the_servers_prefix_hash(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Resuming, the server re-hashes the client's whole prefix inside
    ``file_download``. That takes as long as the disk takes (here: longer than the
    client's RPC timeout); the call must wait, as an upload's begin does, or a
    large partial could never be resumed."""
    with trio.fail_after(30):
        storage, local_dir = tmp_path / "server", tmp_path / "downloads"
        checksum = await make_file(storage / "big.bin", SIZE)
        await plant_download_partial(storage / "big.bin", local_dir, KEPT)
        _, _, client = await server_and_client(
            server_factory,
            client_factory,
            storage,
            client_options={"rpc_timeout": SHORT_RPC_TIMEOUT},
        )
        receiver = FileTransferHandler(storage_dir=tmp_path / "client")

        with slow_server_hashing(monkeypatch):
            result = await receiver.receive_from_server(client, "big.bin", local_dir=local_dir)

        await assert_resumed(result, local_dir / "big.bin", checksum)


async def test_rerun_waits_for_the_servers_whole_file_hash(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A re-run of a download whose file is complete locally asks the server for
    its SHA-256 (``file_stat(sha256=True)``: one read of the whole file). A hash
    slower than the RPC timeout must not read as "a different file", which
    downloads it again as ``big (1).bin``."""
    with trio.fail_after(30):
        storage, local_dir = tmp_path / "server", tmp_path / "downloads"
        await make_file(storage / "big.bin", SIZE)
        _, _, client = await server_and_client(
            server_factory,
            client_factory,
            storage,
            client_options={"rpc_timeout": SHORT_RPC_TIMEOUT},
        )
        receiver = FileTransferHandler(storage_dir=tmp_path / "client")
        first = await receiver.receive_from_server(client, "big.bin", local_dir=local_dir)
        assert first["success"] is True, first

        with slow_server_hashing(monkeypatch):
            again = await receiver.receive_from_server(client, "big.bin", local_dir=local_dir)

        assert again["success"] is True, again
        assert again.get("skipped") is True, again
        assert visible_files(local_dir) == ["big.bin"]


# --------------------------------------------------------------------------- giving up after begin


async def test_upload_given_up_while_streaming_frees_the_receivers_slot(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """Cancelled while streaming: the stream's reset ends the receiver's task, which
    gives back its slot (and keeps the partial for a resume)."""
    with trio.fail_after(30):
        handler, server, client = await server_and_client(
            server_factory, client_factory, tmp_path / "server", max_transfers_per_connection=1
        )
        source = tmp_path / "outbox" / "up.bin"
        await make_file(source, SIZE)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")

        with trio.CancelScope() as scope:

            async def cancel_once_sending(progress: TransferProgress) -> None:
                if progress.transferred > 0:
                    scope.cancel()

            await sender.send_to_server(client, source, on_progress=cancel_once_sending)
        assert scope.cancelled_caught

        assert client.id is not None
        connection = server.clients[client.id].connection
        await wait_until(lambda: handler._receiver._slots.in_use(connection) == 0)
        assert len(partial_files(tmp_path / "server")) == 1


@attrs.frozen
class CutUpload:
    """``up.bin``, cut at :data:`KEPT` (its partial planted on the server), and
    ``other.bin``: what the tests of a sender giving up after its begin use."""

    source: Path
    checksum: str
    other: Path
    other_checksum: str


async def plant_cut_upload(outbox: Path, storage: Path) -> CutUpload:
    """Write ``up.bin`` and ``other.bin`` in ``outbox``; plant ``up.bin``'s partial."""
    source, other = outbox / "up.bin", outbox / "other.bin"
    checksum = await make_file(source, SIZE)
    other_checksum = await make_file(other, SIZE)
    key = transfer_key("up.bin", SIZE, source.stat().st_mtime_ns)
    await trio.to_thread.run_sync(
        _plant_prefix, source, storage / upload_partial_name("up.bin", key), KEPT
    )
    return CutUpload(source, checksum, other, other_checksum)


async def assert_slot_free_and_resumed(
    sender: FileTransferHandler, client: Client, cut: CutUpload, storage: Path
) -> None:
    """The one slot is free again (another file goes through at once), and the
    cut upload, sent again, resumes from its kept partial."""
    second = await sender.send_to_server(client, cut.other)
    assert second["success"] is True, second
    assert second["checksum"] == cut.other_checksum
    retry = await sender.send_to_server(client, cut.source)
    await assert_resumed(retry, storage / "up.bin", cut.checksum)


@pytest.mark.parametrize("how", ["cancelled", "failed"])
async def test_upload_given_up_after_begin_frees_the_receivers_slot(
    how: str,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The receiver answered the begin (it holds a partial, a reservation, a slot
    and a task waiting for the stream); the sender then stops before it opens the
    stream: cancelled, or failing to read its file, while it checks its prefix
    for the resume. It must tell the receiver, or the slot stays taken for the
    connection's lifetime (with one slot: every later upload "overloaded").
    The partial stays for the next try.
    """
    with trio.fail_after(30):
        storage = tmp_path / "server"
        _, _, client = await server_and_client(
            server_factory, client_factory, storage, max_transfers_per_connection=1
        )
        cut = await plant_cut_upload(tmp_path / "outbox", storage)
        source = cut.source
        sender = FileTransferHandler(storage_dir=tmp_path / "client")

        real_resume_hasher = _sender.resume_hasher
        with trio.CancelScope() as scope:

            async def giving_up(*args: Any, **kwargs: Any) -> Any:
                if how == "cancelled":
                    scope.cancel()
                    return await real_resume_hasher(*args, **kwargs)
                raise OSError(errno.EIO, "Input/output error", str(source))

            with monkeypatch.context() as patch:
                patch.setattr(_sender, "resume_hasher", giving_up)
                given_up = await sender.send_to_server(client, source)
        if how == "cancelled":
            assert scope.cancelled_caught
        else:
            assert given_up["success"] is False, given_up
        await assert_slot_free_and_resumed(sender, client, cut, storage)


async def test_upload_cancelled_before_the_begin_answer_frees_the_receivers_slot(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The receiver handled the begin (partial, reservation, slot, a task waiting
    for the stream) but the sender was cancelled before the answer arrived, so it
    never learnt the stream id. It must still tell the receiver (by the transfer's
    key), or with one slot every later upload on the connection is "overloaded"
    until the connection ends. The partial stays for the next try.
    """
    with trio.fail_after(30):
        storage = tmp_path / "server"
        cut = await plant_cut_upload(tmp_path / "outbox", storage)
        with trio.CancelScope() as scope:
            real_begin = Receiver.rpc_begin
            answered: list[dict[str, Any]] = []

            @functools.wraps(real_begin)
            async def begin_then_cancel_the_sender(*args: Any, **kwargs: Any) -> Any:
                answer = await real_begin(*args, **kwargs)
                if not answered:
                    answered.append(answer)
                    scope.cancel()  # the sender's call, before our answer reaches it
                return answer

            monkeypatch.setattr(Receiver, "rpc_begin", begin_then_cancel_the_sender)
            handler, server, client = await server_and_client(
                server_factory, client_factory, storage, max_transfers_per_connection=1
            )
            sender = FileTransferHandler(storage_dir=tmp_path / "client")
            await sender.send_to_server(client, cut.source)
        assert scope.cancelled_caught
        assert answered and answered[0]["offset"] == KEPT
        assert client.id is not None
        connection = server.clients[client.id].connection
        await wait_until(lambda: handler._receiver._slots.in_use(connection) == 0)
        await assert_slot_free_and_resumed(sender, client, cut, storage)


@attrs.define
class RehashWatch:
    """What the patched ``PartialFile.rehash_prefix`` saw: that a hash began,
    and how each one ended (the length hashed, or what it raised)."""

    hashing: threading.Event = attrs.field(factory=threading.Event)
    ended: list[BaseException | int] = attrs.field(factory=list)


def watch_rehash(monkeypatch: pytest.MonkeyPatch, *, pause: float = 0.0) -> RehashWatch:
    """Patch ``PartialFile.rehash_prefix`` to report to a :class:`RehashWatch`,
    after ``pause`` seconds of a step that cannot stop early (a slow disk)."""
    watch = RehashWatch()
    real_rehash = PartialFile.rehash_prefix

    def watched_rehash(file: PartialFile, stop: threading.Event | None = None) -> int:
        watch.hashing.set()
        if pause:
            time.sleep(pause)
        try:
            hashed = real_rehash(file, stop)
        except BaseException as exc:
            watch.ended.append(exc)
            raise
        watch.ended.append(hashed)
        return hashed

    monkeypatch.setattr(PartialFile, "rehash_prefix", watched_rehash)
    return watch


async def cancel_once_hashing(watch: RehashWatch, transfer: Callable[[], Awaitable[Any]]) -> bool:
    """Run ``transfer``, cancelled as soon as a hash began; whether the cancel was caught."""
    with trio.CancelScope() as scope:

        async def cancel() -> None:
            await wait_until(watch.hashing.is_set)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel)
            await transfer()
    return scope.cancelled_caught


async def test_upload_cancelled_while_the_receiver_opens_its_partial_frees_the_slot_first(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The sender is cancelled while the receiver's begin is still in the worker
    thread that hashes the kept partial (long for a big one; it cannot be
    abandoned: it holds the partial's lock and the slot). The cancelled send
    returns only once the receiver has let go, so with one slot the very next
    upload is not refused "overloaded" (it was, while the hash went on)."""
    with trio.fail_after(30):
        storage = tmp_path / "server"
        handler, server, client = await server_and_client(
            server_factory, client_factory, storage, max_transfers_per_connection=1
        )
        cut = await plant_cut_upload(tmp_path / "outbox", storage)
        # A step that cannot stop early, in the receiver's worker thread.
        watch = watch_rehash(monkeypatch, pause=0.5)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        assert await cancel_once_hashing(watch, lambda: sender.send_to_server(client, cut.source))
        assert client.id is not None
        connection = server.clients[client.id].connection
        assert handler._receiver._slots.in_use(connection) == 0
        monkeypatch.undo()
        await assert_slot_free_and_resumed(sender, client, cut, storage)


async def test_a_cancelled_upload_stops_the_receivers_hash_of_its_partial(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The receiver hashes a kept partial before it answers a resuming begin
    (seconds for many GiB). A sender cancelled meanwhile does not wait for the
    whole hash: the receiver stops it between two blocks (here, blocks of one
    byte: 3 MiB of them would take seconds) and lets the slot go."""
    with trio.fail_after(30):
        storage = tmp_path / "server"
        handler, server, client = await server_and_client(
            server_factory, client_factory, storage, max_transfers_per_connection=1
        )
        cut = await plant_cut_upload(tmp_path / "outbox", storage)
        monkeypatch.setattr(_storage, "_HASH_BLOCK", 1)
        watch = watch_rehash(monkeypatch)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        assert await cancel_once_hashing(watch, lambda: sender.send_to_server(client, cut.source))
        ended = watch.ended
        assert len(ended) == 1 and isinstance(ended[0], Stopped), ended
        assert client.id is not None
        connection = server.clients[client.id].connection
        assert handler._receiver._slots.in_use(connection) == 0
        monkeypatch.undo()
        await assert_slot_free_and_resumed(sender, client, cut, storage)


async def test_a_cancelled_download_stops_hashing_its_partial(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A resuming download first hashes its local partial; cancelled meanwhile,
    it stops between two blocks (of one byte here) and keeps the partial."""
    with trio.fail_after(30):
        storage, local_dir = tmp_path / "server", tmp_path / "downloads"
        checksum = await make_file(storage / "big.bin", SIZE)
        partial = await plant_download_partial(storage / "big.bin", local_dir, KEPT)
        _, _, client = await server_and_client(server_factory, client_factory, storage)
        monkeypatch.setattr(_storage, "_HASH_BLOCK", 1)
        watch = watch_rehash(monkeypatch)
        receiver = FileTransferHandler(storage_dir=tmp_path / "client")
        assert await cancel_once_hashing(
            watch, lambda: receiver.receive_from_server(client, "big.bin", local_dir=local_dir)
        )
        ended = watch.ended
        assert len(ended) == 1 and isinstance(ended[0], Stopped), ended
        assert partial.stat().st_size == KEPT
        monkeypatch.undo()
        result = await receiver.receive_from_server(client, "big.bin", local_dir=local_dir)
        await assert_resumed(result, local_dir / "big.bin", checksum)


async def test_an_upload_right_behind_one_cancelled_mid_stream_gets_the_slot(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """One slot; an upload is cancelled while it streams (its stream is reset)
    and another starts at once on the same connection. The reset reaches the
    receiver before the new begin, whose slot the cancelled transfer is still
    letting go of: the begin waits for that, instead of "overloaded"."""
    with trio.fail_after(60):
        storage = tmp_path / "server"
        _, _, client = await server_and_client(
            server_factory, client_factory, storage, max_transfers_per_connection=1
        )
        big, small = tmp_path / "outbox" / "big.bin", tmp_path / "outbox" / "next.bin"
        await make_file(big, 16 * SIZE)
        checksum = await make_file(small, SIZE)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        for attempt in range(5):
            with trio.CancelScope() as scope:

                def cancel_once_streaming(progress: TransferProgress) -> None:
                    if progress.transferred > progress.resumed_from:
                        scope.cancel()

                await sender.send_to_server(
                    client, big, cancel_once_streaming, remote_name=f"big{attempt}.bin"
                )
            assert scope.cancelled_caught
            result = await sender.send_to_server(client, small, remote_name=f"next{attempt}.bin")
            assert result["success"] is True, (attempt, result)
            assert result["checksum"] == checksum


async def test_finish_abandons_by_key_alone(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """``file_upload_finish(key=..., abandon=True)`` lets go of nothing it was not
    given (no stream of that key: ``abandoned`` is False), and a key with a stream
    id, a key without ``abandon``, or neither is refused as invalid arguments."""
    with trio.fail_after(30):
        _, _, client = await server_and_client(server_factory, client_factory, tmp_path / "s")
        assert await client.call("file_upload_finish", key="k" * 32, abandon=True) == {
            "abandoned": False
        }
        for arguments in (
            {"key": "k" * 32, "abandon": True, "stream_id": 2},
            {"key": "k" * 32},
            {"abandon": True},
            {},
        ):
            with pytest.raises(RPCError) as refused:
                await client.call("file_upload_finish", **arguments)
            assert refused.value.code == "invalid_arguments", arguments


async def test_the_same_file_sent_twice_at_once_ends_both_sends(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """A second send of a file still streaming on the same connection replaces
    the first on the receiver (it resumes from the first one's partial). The
    first is told (its stream is reset) and returns its verdict, "superseded",
    instead of waiting for credit for good."""
    with trio.fail_after(60):
        storage = tmp_path / "server"
        _, _, client = await server_and_client(server_factory, client_factory, storage)
        source = tmp_path / "outbox" / "big.bin"
        # Four receive windows: the first send needs credit after it is replaced.
        checksum = await make_file(source, 4 * SIZE)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        first_streaming, second_streaming = trio.Event(), trio.Event()
        results: dict[str, dict[str, Any]] = {}

        async def first_progress(progress: TransferProgress) -> None:
            if progress.transferred and not progress.percent >= 100:
                first_streaming.set()
                await second_streaming.wait()  # paused mid-stream until replaced

        def second_progress(progress: TransferProgress) -> None:
            second_streaming.set()

        async def first() -> None:
            results["first"] = await sender.send_to_server(
                client, source, on_progress=first_progress
            )

        async def second() -> None:
            await first_streaming.wait()
            results["second"] = await sender.send_to_server(
                client, source, on_progress=second_progress
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)
    assert results["second"]["success"] is True, results
    assert await file_sha256(storage / "big.bin") == checksum
    assert results["first"]["success"] is False, results
    assert results["first"]["code"] == "superseded", results


async def test_a_send_superseded_before_it_opened_its_stream_says_superseded(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """Two sends of one file to one name on one connection, over a partial
    an earlier cancelled send left: the older one is told "superseded" (or
    "busy"), also when the receiver let its stream go before the sender
    opened it; that one was told "cancelled: the receiver stopped" (9 runs of
    60; found by the cancellation stress review). Seeded timings."""
    rng = random.Random(1)
    _, _, client = await server_and_client(server_factory, client_factory, tmp_path / "s")
    source = tmp_path / "outbox" / "big.bin"
    await make_file(source, 4 * SIZE)
    transfer = FileTransferHandler(storage_dir=tmp_path / "client")
    codes: collections.Counter[str] = collections.Counter()

    async def send(name: str, delay: float) -> None:
        await trio.sleep(delay)
        result = await transfer.send_to_server(client, source, remote_name=name)
        codes["ok" if result["success"] else result["code"]] += 1

    with trio.fail_after(120):
        for attempt in range(30):
            name = f"r{attempt}/big.bin"
            with trio.move_on_after(rng.uniform(0.005, 0.02)):
                await transfer.send_to_server(client, source, remote_name=name)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, name, 0)
                nursery.start_soon(send, name, rng.uniform(0, 0.01))
    assert set(codes) <= {"ok", "superseded", "busy"}, codes
    assert codes["ok"] >= 30, codes  # every name stored


def _rewrite(path: Path, *, keep_mtime: bool = False) -> None:
    """Write new bytes over the first and the last MiB of ``path`` in place
    (its size stays): a part already sent, and one not yet. ``keep_mtime``:
    then put its modification time back, as ``touch -r``, ``rsync --inplace
    -t`` or tar do."""
    before = path.stat()
    with open(path, "r+b") as file:
        file.write(os.urandom(MiB))
        file.seek(-MiB, os.SEEK_END)
        file.write(os.urandom(MiB))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["mtime-moves", "mtime-put-back"])
@pytest.mark.parametrize("direction", ["upload", "download"])
async def test_a_file_written_while_it_is_sent_is_not_published(
    direction: str,
    keep_mtime: bool,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
) -> None:
    """The sender's file is written in place (same size) while it is sent. The
    bytes received are then no one version of it, though they match the digest
    the sender computed of what it read: the sender finds the file changed
    before its trailer and fails the transfer with source_changed; nothing is
    published (before, a mix of the two versions was, as a success; and still
    was until 2026-12-05 when the writer put the file's mtime back)."""
    with trio.fail_after(60):
        storage, local_dir = tmp_path / "server", tmp_path / "downloads"
        _, _, client = await server_and_client(server_factory, client_factory, storage)
        source = (tmp_path / "outbox" if direction == "upload" else storage) / "big.bin"
        await make_file(source, 4 * SIZE)
        written = False

        async def write_it_once(progress: TransferProgress) -> None:
            nonlocal written
            if progress.transferred >= MiB and not written:
                written = True
                await trio.to_thread.run_sync(
                    functools.partial(_rewrite, source, keep_mtime=keep_mtime)
                )

        transfer = FileTransferHandler(storage_dir=tmp_path / "client")
        if direction == "upload":
            result = await transfer.send_to_server(client, source, on_progress=write_it_once)
            arrived = storage / "big.bin"
        else:
            result = await transfer.receive_from_server(
                client, "big.bin", local_dir, on_progress=write_it_once
            )
            arrived = local_dir / "big.bin"
        assert written
        assert result["success"] is False, result
        assert result["code"] == "source_changed", result
        assert not arrived.exists()
        # Nor is its partial kept: it holds a prefix of a version of the file
        # that no later send resumes (the transfer key names the old size and
        # mtime). (An upload's verdict is the sender's own: the server hears of
        # it from the stream's reset, a moment later.)
        await wait_until(lambda: partial_files(arrived.parent) == [])


async def test_an_upload_whose_file_changed_leaves_no_partial_when_its_client_leaves_at_once(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """The sender's file grows while it is sent, and its client disconnects as
    soon as the transfer returns ``source_changed`` (as ``async with client:``
    or the CLI does). The reset that tells the receiver to remove its partial
    travels behind the data still in flight: until 2026-12-07 the transfer
    returned at once, the connection closed before the server read the reset,
    and the server kept the whole partial, which no send resumes (a review:
    3 of 3 at 256 MiB). The sender now waits for the receiver to have taken
    its reset (a few seconds at most)."""
    with trio.fail_after(60):
        storage = tmp_path / "server"
        _, server, client = await server_and_client(server_factory, client_factory, storage)
        source = tmp_path / "outbox" / "growing.bin"
        await make_file(source, 64 * MiB)
        grown = False

        def grow_once(progress: TransferProgress) -> None:
            nonlocal grown
            if progress.transferred >= 8 * MiB and not grown:
                grown = True
                with source.open("ab") as file:
                    file.write(b"x" * 10)

        transfer = FileTransferHandler(storage_dir=tmp_path / "client")
        result = await transfer.send_to_server(client, source, on_progress=grow_once)
        await client.disconnect()
        assert result["code"] == "source_changed", result
        await wait_until(lambda: not server.clients, timeout=10)
    assert partial_files(storage) == []


@attrs.frozen
class _LeftPartial:
    """A server, a client of it, and the partial a cut upload of ``source`` left."""

    server: Server
    client: Client
    storage: Path
    source: Path
    transfer: FileTransferHandler


async def _left_partial(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path, name: str
) -> _LeftPartial:
    """Upload ``SIZE`` bytes as ``name``, cancelled once a MiB has gone: its
    partial is kept (waited for, on the server)."""
    storage = tmp_path / "server"
    _, server, client = await server_and_client(server_factory, client_factory, storage)
    source = tmp_path / "outbox" / name
    await make_file(source, SIZE)
    transfer = FileTransferHandler(storage_dir=tmp_path / "client")
    with trio.CancelScope() as scope:

        def cancel_once_moving(progress: TransferProgress) -> None:
            if progress.transferred >= MiB:
                scope.cancel()

        await transfer.send_to_server(client, source, on_progress=cancel_once_moving)
    assert scope.cancelled_caught
    await wait_until(lambda: len(partial_files(storage)) == 1)
    return _LeftPartial(server, client, storage, source, transfer)


async def test_publishing_a_file_removes_its_senders_partials_of_older_versions(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """A cut upload leaves a partial keyed by the file's size and modification
    time; the file then changes and is sent whole. No send resumes the old
    partial: until 2026-12-07 it stayed for partial_ttl beside the published
    file (a review: up to half the file each time). The sender's own partials
    of older versions go when the new version's upload begins."""
    with trio.fail_after(60):
        left = await _left_partial(server_factory, client_factory, tmp_path, "report.bin")
        await make_file(left.source, SIZE + 1)  # another version: size and mtime moved
        result = await left.transfer.send_to_server(left.client, left.source)
        assert result["success"] is True and result["resumed_from"] == 0, result
    assert partial_files(left.storage) == []
    assert await file_sha256(left.storage / "report.bin") == await file_sha256(left.source)


async def test_a_begin_answered_already_there_removes_the_senders_partial_of_it(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """A cut upload left its partial; the same bytes then arrived from another
    address (another owner) under the name. Sending again is answered
    ``already_there``, and the partial, which nothing will resume, goes with
    it (until 2026-12-07 it stayed, a review found)."""
    with trio.fail_after(60):
        left = await _left_partial(server_factory, client_factory, tmp_path, "x.bin")
        other = await client_factory(left.server, connect=False)
        await other.connect(
            stream=await trio.open_tcp_stream(
                "127.0.0.1", left.server.port, local_address="127.0.0.2"
            )
        )
        copy = tmp_path / "elsewhere" / "x.bin"
        copy.parent.mkdir()
        copy.write_bytes(left.source.read_bytes())  # the same bytes, another mtime
        assert (await left.transfer.send_to_server(other, copy))["success"] is True
        assert len(partial_files(left.storage)) == 1  # the first owner's, not the other's
        again = await left.transfer.send_to_server(left.client, left.source)
        assert again["success"] is True and again.get("skipped") is True, again
    assert partial_files(left.storage) == []


@pytest.mark.parametrize("direction", ["upload", "download", "range"])
async def test_a_file_whose_mode_changes_while_it_is_sent_is_published(
    direction: str, server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """A change of mode moves the file's change time as a write does, but
    not its content: read again at the end, it is found unchanged, and the
    transfer succeeds (a range too: the part read again is the range)."""
    with trio.fail_after(60):
        storage, local_dir = tmp_path / "server", tmp_path / "downloads"
        _, _, client = await server_and_client(server_factory, client_factory, storage)
        source = (tmp_path / "outbox" if direction == "upload" else storage) / "big.bin"
        checksum = await make_file(source, 4 * SIZE)
        changed = False

        async def chmod_it_once(progress: TransferProgress) -> None:
            nonlocal changed
            if progress.transferred and not changed:
                changed = True
                source.chmod(0o640)

        transfer = FileTransferHandler(storage_dir=tmp_path / "client")
        if direction == "upload":
            result = await transfer.send_to_server(client, source, on_progress=chmod_it_once)
            arrived = storage / "big.bin"
        elif direction == "download":
            result = await transfer.receive_from_server(
                client, "big.bin", local_dir, on_progress=chmod_it_once
            )
            arrived = local_dir / "big.bin"
        else:
            offset, length = MiB + 3, 2 * SIZE
            result = await transfer.receive_from_server(
                client,
                "big.bin",
                local_dir,
                on_progress=chmod_it_once,
                offset=offset,
                length=length,
            )
            arrived = Path(result.get("path", local_dir / "missing"))
            checksum = hashlib.sha256(source.read_bytes()[offset : offset + length]).hexdigest()
        assert changed
        assert result["success"] is True, result
        assert await file_sha256(arrived) == checksum


async def test_a_download_cancelled_as_its_connection_closes_lets_go_of_its_partial(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """``disconnect()`` and the caller's own cancellation land together. The
    download's close of its partial file, on the connection's failure, was
    cancelled before it began: the file stayed open and locked, and the same
    download got "busy" for the rest of the process (9 runs of 40; found by
    the cancellation stress review). Gaps of 0 to 7 scheduler passes
    between the two."""
    storage = tmp_path / "server"
    await make_file(storage / "big.bin", 8 * SIZE)
    _, server = await storage_server(server_factory, storage)
    transfer = FileTransferHandler(storage_dir=tmp_path / "client")

    async def cut_off(run: int, passes: int) -> list[str]:
        """One download, cut off so; what it left open."""
        out = tmp_path / f"out{run}"
        client = await client_factory(server)
        before = open_descriptors()
        scope = trio.CancelScope()

        async def download() -> None:
            with scope:
                await transfer.receive_from_server(client, "big.bin", out)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(download)
            await wait_until(lambda: bool(partial_files(out)), interval=0.001)
            nursery.start_soon(client.disconnect)
            for _ in range(passes):
                await trio.lowlevel.cancel_shielded_checkpoint()
            scope.cancel()
        return [target for target in opened_since(before) if str(out) in target]

    with trio.fail_after(60):
        for run in range(24):  # each gap three times: it does not leak every time
            assert await cut_off(run, run % 8) == [], run


#: What an application's on_progress may raise: a bug, or its print() into a
#: closed pipe (an OSError, which is no I/O error of the transfer).
CALLBACK_ERRORS = [RuntimeError("a bug in the progress bar"), BrokenPipeError(32, "Broken pipe")]


@pytest.mark.parametrize("error", CALLBACK_ERRORS, ids=["bug", "broken-pipe"])
async def test_a_progress_callback_that_raises_keeps_the_download_resumable(
    error: Exception, server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """The user's on_progress raises in the middle of a download: the exception
    reaches the caller as it is (an OSError too, not an io_error result), and
    the bytes received are kept, so the same download resumes (before, the
    partial was removed as if the data were bad)."""
    with trio.fail_after(60):
        storage, local_dir = tmp_path / "server", tmp_path / "downloads"
        checksum = await make_file(storage / "big.bin", 4 * SIZE)
        _, _, client = await server_and_client(server_factory, client_factory, storage)
        transfer = FileTransferHandler(storage_dir=tmp_path / "client")

        def fails_once_started(progress: TransferProgress) -> None:
            if progress.transferred:
                raise error

        with pytest.raises(type(error)) as raised:
            await transfer.receive_from_server(
                client, "big.bin", local_dir, on_progress=fails_once_started
            )
        assert raised.value is error
        assert len(partial_files(local_dir)) == 1
        again = await transfer.receive_from_server(client, "big.bin", local_dir)
    assert again["success"] is True, again
    assert again["resumed_from"] > 0, again
    assert await file_sha256(local_dir / "big.bin") == checksum


@pytest.mark.parametrize("cancelling", [False, True], ids=["raises", "cancels-and-raises"])
@pytest.mark.parametrize("error", CALLBACK_ERRORS, ids=["bug", "broken-pipe"])
@pytest.mark.parametrize("what", ["file", "directory", "files"])
async def test_a_progress_callback_error_reaches_the_caller_as_it_is(
    what: str,
    error: Exception,
    cancelling: bool,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
) -> None:
    """Uploads too: what on_progress raises reaches the caller of the transfer
    itself, not as an io_error result (an OSError) nor inside an ExceptionGroup
    (several files moved at once: a directory, send_files_to_server); also
    when the callback cancels the caller's scope as it raises (then, with the
    Cancelled beside it, it came out in a group; cancellation stress review)."""
    with trio.fail_after(60):
        _, _, client = await server_and_client(server_factory, client_factory, tmp_path / "s")
        outbox = tmp_path / "outbox"
        for index in range(6):
            await make_file(outbox / f"f{index}.bin", SIZE if index % 2 else 1000)
        transfer = FileTransferHandler(storage_dir=tmp_path / "client")

        scope = trio.CancelScope()

        def fails(progress: TransferProgress) -> None:
            if cancelling:
                if progress.total_size < SIZE or progress.transferred == progress.total_size:
                    return  # while a large file is on its way, with others beside it
                scope.cancel()  # the caller's scope ends as the callback raises
            raise error

        async def send() -> Any:
            if what == "file":
                return await transfer.send_to_server(client, outbox / "f1.bin", on_progress=fails)
            if what == "directory":
                return await transfer.send_to_server(client, outbox, on_progress=fails)
            files = sorted(outbox.iterdir())
            return await transfer.send_files_to_server(client, files, on_progress=fails)

        with pytest.raises(type(error)) as raised, scope:
            await send()
        assert raised.value is error


# --------------------------------------------------------------------------- old partials


async def test_download_from_zero_removes_partials_of_older_versions(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """A download cut, then its file changed on the server (another size or
    mtime: another key), starts a new partial; the old one (up to the whole old
    size) must go, not stay hidden forever. Only idle download partials of that
    same name: published files, partials of other names, an upload's or a push's
    partial of the same name (a directory that also receives) and a partial a
    transfer holds stay.
    """
    with trio.fail_after(30):
        storage, local_dir = tmp_path / "server", tmp_path / "downloads"
        checksum = await make_file(storage / "log.bin", SIZE)
        old_version = partial_basename(
            "log.bin", download_transfer_id(transfer_key("log.bin", KEPT, 1))
        )
        (local_dir / "sub").mkdir(parents=True)
        keep = {
            # a published file, another name's partial, and partials of names
            # that end like this one (``x-log.bin``: the ids have one length)
            "log (1).bin": b"published",
            partial_basename("catalog.bin", "c" * 32): b"another name",
            partial_basename("x-log.bin", download_transfer_id("d" * 32)): b"ends in -log.bin",
            "sub/" + partial_basename("log.bin", download_transfer_id("e" * 32)): b"elsewhere",
            # the same name's partial of an upload or a push being received here
            partial_basename("log.bin", "a" * 32): b"a push's partial, resumable",
        }
        for relative, data in {**keep, old_version: os.urandom(KEPT)}.items():
            (local_dir / relative).write_bytes(data)
        # Another transfer of the same name, under way (it holds its partial's lock).
        busy = StorageRoot(local_dir).open_partial(
            "log.bin", download_transfer_id("f" * 32), resume=False
        )
        busy.write_block(b"being written")
        try:
            _, _, client = await server_and_client(server_factory, client_factory, storage)
            receiver = FileTransferHandler(storage_dir=tmp_path / "client")

            result = await receiver.receive_from_server(client, "log.bin", local_dir=local_dir)

            assert result["success"] is True, result
            assert await file_sha256(local_dir / "log.bin") == checksum
            assert not (local_dir / old_version).exists()
            for relative, data in keep.items():
                assert (local_dir / relative).read_bytes() == data, relative
            assert busy.partial_name is not None
            assert (local_dir / busy.partial_name).read_bytes() == b"being written"
        finally:
            busy.close()


def test_a_directory_that_cannot_be_listed_removes_no_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removing older versions' partials is best effort: a drop box the client may
    write to but not list (or an I/O error) must not fail the download."""
    old_version = partial_basename("log.bin", download_transfer_id("a" * 32))
    (tmp_path / old_version).write_bytes(b"an older version")

    def unlistable(path: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "scandir", unlistable)
    new_version = download_transfer_id("b" * 32)
    assert StorageRoot(tmp_path).remove_other_partials("log.bin", new_version) == 0
    assert (tmp_path / old_version).exists()


async def test_a_download_partial_named_by_an_earlier_version_is_resumed(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """Before download ids had their ``dl_`` prefix, a download's partial was
    named by its key alone: one cut before an upgrade resumes after it (taken
    over under the new name), and none is left behind."""
    with trio.fail_after(30):
        storage, local_dir = tmp_path / "server", tmp_path / "downloads"
        checksum = await make_file(storage / "log.bin", SIZE)
        info = (storage / "log.bin").stat()
        former = local_dir / partial_basename(
            "log.bin", transfer_key("log.bin", info.st_size, info.st_mtime_ns)
        )
        await trio.to_thread.run_sync(_plant_prefix, storage / "log.bin", former, KEPT)
        _, _, client = await server_and_client(server_factory, client_factory, storage)
        receiver = FileTransferHandler(storage_dir=tmp_path / "client")

        result = await receiver.receive_from_server(client, "log.bin", local_dir=local_dir)

        await assert_resumed(result, local_dir / "log.bin", checksum)
        assert partial_files(local_dir) == []


def test_adopting_a_partial_never_replaces_one_nor_takes_one_in_use(tmp_path: Path) -> None:
    """The take-over renames only an idle former partial, and only onto a free name."""
    root = StorageRoot(tmp_path)
    former_id, current_id = "a" * 32, download_transfer_id("a" * 32)
    former = tmp_path / partial_basename("f.bin", former_id)
    current = tmp_path / partial_basename("f.bin", current_id)
    former.write_bytes(b"former")
    current.write_bytes(b"current")
    assert root.adopt_partial("f.bin", former_id, current_id) is False
    assert current.read_bytes() == b"current"
    assert former.read_bytes() == b"former"

    current.unlink()
    in_use = root.open_partial("f.bin", former_id, resume=True)
    try:
        assert root.adopt_partial("f.bin", former_id, current_id) is False
    finally:
        in_use.close()
    assert not current.exists()
    assert root.adopt_partial("f.bin", former_id, current_id) is True
    assert current.read_bytes() == b"former"
    assert not former.exists()
    assert root.adopt_partial("missing.bin", former_id, current_id) is False
