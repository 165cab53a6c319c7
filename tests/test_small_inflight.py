"""Small uploads in flight together: one thread hop to read them, several per call.

``send_to_server`` calls running at once on one connection (a nursery of
them) read their files in a shared worker-thread hop and travel together as
``file_upload_batch`` calls; a lone caller still sends its file at once, in
one ``file_upload_small`` call. Every file keeps its own result, exactly what
a call of its own would have answered.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from conduit import FileTransferHandler
from conduit.accounts import Accounts
from conduit.protocol.pake import MIN_STRETCH
from conduit.transfer import _shared_hop, _small
from conduit.transfer._backend_local import LocalBackend
from conduit.transfer._shared_hop import SharedHop
from conduit.transfer._space import DIRECTORY_ALLOWANCE
from conduit.transfer._storage import ENTRY_ALLOWANCE
from conftest import ClientFactory, ServerFactory
from transfer_helpers import partial_files, record_calls, storage_server, visible_files

KiB = 1024


def _sources(directory: Path, count: int, size: int = 4 * KiB) -> dict[str, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    files = {f"small-{index:03d}.bin": os.urandom(size) for index in range(count)}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


async def _upload_all(
    client: Any, directory: Path, names: list[str], tasks: int
) -> dict[str, dict[str, Any]]:
    """``send_to_server`` of every name, ``tasks`` at once; the results by name."""
    transfer = FileTransferHandler()
    results: dict[str, dict[str, Any]] = {}
    pending = iter(names)

    async def worker() -> None:
        for name in pending:
            results[name] = await transfer.send_to_server(
                client, directory / name, remote_name=name
            )

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(worker)
    return results


async def test_small_uploads_in_flight_share_calls(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    received: list[str] = []

    @handler.on_file_received
    async def heard(_client: Any, path: str, metadata: dict[str, Any]) -> None:
        received.append(metadata["filename"])

    client = await client_factory(server)
    files = _sources(tmp_path / "source", 24)
    methods = record_calls(monkeypatch)
    with trio.fail_after(30):
        results = await _upload_all(client, tmp_path / "source", sorted(files), tasks=8)
    for name, data in files.items():
        result = results[name]
        assert result["success"] is True, result
        assert result["path"] == name and result["size"] == len(data)
        assert result["checksum"] == hashlib.sha256(data).hexdigest()
        assert result["resumed_from"] == 0
        assert (storage / name).read_bytes() == data
    assert visible_files(storage) == sorted(files)
    assert sorted(received) == sorted(files)
    # Eight sends that start together go together: far fewer calls than files.
    assert "file_upload_batch" in methods
    assert len(methods) <= len(files) // 2, methods
    assert partial_files(storage) == []


async def test_a_lone_upload_goes_at_once_in_one_call(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    _, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    files = _sources(tmp_path / "source", 3)
    methods = record_calls(monkeypatch)
    with trio.fail_after(30):
        results = await _upload_all(client, tmp_path / "source", sorted(files), tasks=1)
    assert all(result["success"] for result in results.values()), results
    assert methods == ["file_upload_small"] * 3
    assert visible_files(storage) == sorted(files)


async def test_a_sequential_sender_skips_the_gathering_pass_and_a_burst_still_gathers(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One sender, one file after the other: after LONE_SENDS files went alone
    # with nothing queued, its looks skip the schedule point that only gathers
    # sends starting together. A burst after that still gathers: its first
    # file goes alone, the others queue (which ends the skipping) and share calls.
    storage = tmp_path / "storage"
    _, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    files = _sources(tmp_path / "source", 5 + 8 + 2)
    names = sorted(files)
    looked: list[bool] = []
    real_look = _small._look

    async def look(*args: Any, alone: bool = False) -> Any:
        looked.append(alone)
        return await real_look(*args, alone=alone)

    monkeypatch.setattr(_small, "_look", look)
    methods = record_calls(monkeypatch)
    with trio.fail_after(30):
        sequential = await _upload_all(client, tmp_path / "source", names[:5], tasks=1)
    lone = _small.LONE_SENDS
    assert looked == [False] * lone + [True] * (5 - lone)
    assert methods == ["file_upload_small"] * 5
    looked.clear()
    methods.clear()
    with trio.fail_after(30):
        burst = await _upload_all(client, tmp_path / "source", names[5:13], tasks=8)
    assert looked[0] is True and not any(looked[1:]), looked
    assert methods[0] == "file_upload_small" and "file_upload_batch" in methods, methods
    assert len(methods) <= 3, methods
    looked.clear()
    with trio.fail_after(30):
        after = await _upload_all(client, tmp_path / "source", names[13:], tasks=1)
    # The burst queued: the next sends gather again until LONE_SENDS went alone.
    assert looked == [False, False]
    for name, result in {**sequential, **burst, **after}.items():
        assert result["success"] is True, result
        assert (storage / name).read_bytes() == files[name]
    assert visible_files(storage) == names


async def test_each_file_in_flight_gets_its_own_result(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    accounts = Accounts(tmp_path / "accounts.json", stretch=MIN_STRETCH)
    # Five files, what their entries may take, the root directory's block, and a little.
    quota = 5 * (4 * KiB + ENTRY_ALLOWANCE) + DIRECTORY_ALLOWANCE + KiB
    accounts.add("carol", "pw-carol", quota=quota)
    client = await client_factory(server)
    assert client.id is not None
    peer = server.clients[client.id]
    peer.username = "carol"
    peer.account = accounts.get("carol")
    files = _sources(tmp_path / "source", 8)
    with trio.fail_after(30):
        results = await _upload_all(client, tmp_path / "source", sorted(files), tasks=8)
    stored = [name for name, result in results.items() if result["success"]]
    refused = [result for result in results.values() if not result["success"]]
    # The quota holds five of the eight: each of the others fails alone.
    assert len(stored) == 5 and len(refused) == 3, results
    assert all(result["code"] == "quota_exceeded" for result in refused), refused
    assert visible_files(storage / "carol") == sorted(stored)
    for name in stored:
        assert (storage / "carol" / name).read_bytes() == files[name]
    backend = handler.backend
    assert isinstance(backend, LocalBackend)  # a local storage_dir
    assert backend.budget._active == set()
    assert partial_files(storage) == []


async def test_files_already_there_and_collisions_in_flight(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    _, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    files = _sources(tmp_path / "source", 8)
    names = sorted(files)
    storage.mkdir()
    (storage / names[0]).write_bytes(files[names[0]])  # the same bytes: already there
    (storage / names[1]).write_bytes(b"someone else's")  # taken: stored beside it
    with trio.fail_after(30):
        results = await _upload_all(client, tmp_path / "source", names, tasks=8)
    again, taken = results[names[0]], results[names[1]]
    assert again["success"] is True and again["skipped"] is True, again
    assert again["reason"] == "already_there"
    stem = names[1].removesuffix(".bin")
    assert taken["success"] is True and taken["path"] == f"{stem} (1).bin", taken
    assert (storage / names[1]).read_bytes() == b"someone else's"
    assert (storage / f"{stem} (1).bin").read_bytes() == files[names[1]]
    for name in names[2:]:
        assert results[name]["success"] is True and "skipped" not in results[name]
        assert (storage / name).read_bytes() == files[name]


async def test_uploads_queued_when_the_connection_closes_fail_and_end(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    stuck = trio.Event()

    @handler.on_file_received
    async def hold(_client: Any, path: str, metadata: dict[str, Any]) -> None:
        stuck.set()
        await trio.sleep_forever()  # the answer never comes: later files queue

    client = await client_factory(server)
    files = _sources(tmp_path / "source", 12)
    results: dict[str, dict[str, Any]] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def upload_all() -> None:
                results.update(await _upload_all(client, tmp_path / "source", sorted(files), 12))

            nursery.start_soon(upload_all)
            await stuck.wait()
            await client.disconnect()
    assert sorted(results) == sorted(files)
    for result in results.values():
        assert result["success"] is False and result["code"] == "connection_closed", result


class _CountedHop(SharedHop[int, int]):
    """A shared hop that records how many calls each worker-thread hop ran."""

    hops: list[int]

    def _run_all(self, jobs: list[Any]) -> None:
        self.hops.append(len(jobs))
        super()._run_all(jobs)


async def test_a_shared_hop_runs_queued_calls_together_and_drops_cancelled_ones() -> None:
    release = threading.Event()
    ran: list[int] = []

    def work(arg: int) -> int:
        if arg == 0:
            release.wait(10)  # the first hop is under way while the others queue
        if arg == 3:
            raise ValueError("three")
        ran.append(arg)
        return arg * 10

    hop = _CountedHop(work)
    hop.hops = []
    results: dict[int, object] = {}

    async def call(arg: int) -> None:
        try:
            results[arg] = await hop.run(arg)
        except ValueError as exc:
            results[arg] = exc

    dropped = trio.CancelScope()

    async def cancelled() -> None:
        with dropped:
            await hop.run(2)
        results[2] = "cancelled"

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, 0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call, 1)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(cancelled)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call, 3)
            nursery.start_soon(call, 4)
            await trio.testing.wait_all_tasks_blocked()
            dropped.cancel()  # queued behind the first hop: its call never runs
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    assert ran == [0, 1, 4]
    assert results[0] == 0 and results[1] == 10 and results[4] == 40
    assert results[2] == "cancelled"
    assert isinstance(results[3], ValueError)  # its own exception, nobody else's
    # One hop for the first call, one for the three still queued behind it.
    assert hop.hops == [1, 3]


async def _hop_with_three_queued(
    work: Callable[[int], int],
    monkeypatch: pytest.MonkeyPatch,
    before_release: Callable[[SharedHop[int, int]], None] = lambda hop: None,
) -> dict[int, object]:
    """Run ``work`` in a shared hop: 0 in a first hop, held under way while
    1, 2 and 3 queue behind it (one leads the next hop, the others go with
    it), then ``before_release(hop)`` and the first hop's end. Each call's
    value, or the exception it raised."""
    release = threading.Event()

    def first_held(arg: int) -> int:
        if arg == 0:
            release.wait(10)
        return work(arg)

    # Queued calls stay queued however slow this machine is today.
    monkeypatch.setattr(_shared_hop, "STALLED_AFTER", 60.0)
    hop = SharedHop(first_held)
    outcomes: dict[int, object] = {}

    async def call(arg: int) -> None:
        try:
            outcomes[arg] = await hop.run(arg)
        except (Exception, SystemExit) as exc:
            outcomes[arg] = exc

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, 0)
                await trio.testing.wait_all_tasks_blocked()
                for arg in (1, 2, 3):
                    nursery.start_soon(call, arg)
                await trio.testing.wait_all_tasks_blocked()
                before_release(hop)
                release.set()
    finally:
        release.set()
        hop.close()
    return outcomes


async def test_a_hop_that_fails_as_a_whole_fails_every_call_it_carried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shared hop whose thread cannot be had (``can't start new thread``)
    fails its leader with that error and each call it carried with a copy of
    it: none of them ran, and none returns None as if it had (before, the
    calls carried along did)."""
    ran: list[int] = []

    def work(arg: int) -> int:
        ran.append(arg)
        return arg * 10

    async def no_thread(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("can't start new thread")

    def refuse_threads(hop: SharedHop[int, int]) -> None:
        monkeypatch.setattr(hop._worker, "run", no_thread)

    outcomes = await _hop_with_three_queued(work, monkeypatch, refuse_threads)
    assert ran == [0] and outcomes[0] == 0
    errors = [outcomes[arg] for arg in (1, 2, 3)]
    assert all(isinstance(error, RuntimeError) for error in errors), outcomes
    assert all(str(error) == "can't start new thread" for error in errors)
    assert len({id(error) for error in errors}) == 3  # a copy each
    # Only the leader's error went through the failed hop's frames; the
    # copies carry none of them (see conduit._stored_errors).
    through_the_hop = [error for error in errors if "no_thread" in _frames(error)]
    assert len(through_the_hop) == 1


def _frames(error: object) -> set[str]:
    """The names of the functions in ``error``'s traceback."""
    assert isinstance(error, BaseException)
    names = set()
    traceback = error.__traceback__
    while traceback is not None:
        names.add(traceback.tb_frame.f_code.co_name)
        traceback = traceback.tb_next
    return names


async def test_a_call_that_raises_systemexit_in_a_hop_is_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call whose function raises a ``BaseException`` (``SystemExit``) in a
    shared hop gets it raised to its own caller; the calls beside it in the
    hop run and return their values (before: that call returned None, the
    calls behind it never ran, and the hop's leader raised the exit)."""

    def work(arg: int) -> int:
        if arg == 2:
            raise SystemExit(3)
        return arg * 10

    outcomes = await _hop_with_three_queued(work, monkeypatch)
    exit_ = outcomes.pop(2)
    assert isinstance(exit_, SystemExit) and exit_.code == 3
    assert outcomes == {0: 0, 1: 10, 3: 30}


async def test_a_stalled_hop_holds_nobody_up(autojump_clock: trio.testing.MockClock) -> None:
    release = threading.Event()
    ran: list[int] = []

    def work(arg: int) -> int:
        if arg == 0:
            release.wait(10)  # a file on a hung mount
        ran.append(arg)
        return arg

    hop = SharedHop(work)
    results: dict[int, int] = {}
    done = {arg: trio.Event() for arg in (0, 1, 2)}

    async def call(arg: int) -> None:
        results[arg] = await hop.run(arg)
        done[arg].set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, 0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call, 1)  # queues behind the first hop, then leaves it
            with trio.fail_after(5):
                await done[1].wait()
            await trio.sleep(1)
            nursery.start_soon(call, 2)  # never queues behind a stalled hop
            with trio.fail_after(5):
                await done[2].wait()
            assert ran == [1, 2]  # both ran while the first call was still stuck
            release.set()
    finally:
        release.set()
    assert ran == [1, 2, 0] and results == {0: 0, 1: 1, 2: 2}
