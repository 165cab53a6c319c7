"""Transfers that a full connection refused wait their turn (``conduit.transfer._turns``).

First :func:`take_turn` itself, with attempts that stand for a connection
taking ``capacity`` transfers at once (real Trio scheduling, no sockets); then
the handler end to end over loopback: more uploads and downloads at once than
the server's transfer slots, and more downloads than the client's own
receive budget, all succeed, through the Trio API and the asyncio shim; a
download that finds a served one's slot still ending waits for it; and a
transfer's verdict call refused by the call limit is asked again, not the
transfer.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from conduit import Client, FileTransferHandler, Peer, RPCError, Server
from conduit.protocol.connection import SERVER_BUDGET_REFUSAL, USER_BUDGET_REFUSAL
from conduit.transfer._sender import _ask_verdict
from conduit.transfer._slots import USER_TRANSFERS_REFUSAL, TransferLimits, TransferSlots
from conduit.transfer._space import USER_RESERVATION_REFUSAL
from conduit.transfer._turns import BUDGET_PATIENCE, take_turn
from conftest import (
    ClientFactory,
    ServerFactory,
    client_descriptor,
    server_descriptor,
    wait_until,
)
from transfer_helpers import MiB, make_file, record_calls, register_replacing


class _Connection:
    """Stands for a connection: the lines only need a weakly referable key."""


@attrs.define
class _Peer:
    """What ``take_turn`` reads of a peer: its connection (a key) and whether it is up."""

    connection: _Connection = attrs.field(factory=_Connection)
    connected: bool = True


@attrs.define
class _FullAt:
    """A connection that takes ``capacity`` transfers at once and refuses the next
    with ``code``; each admitted transfer runs until :meth:`finish_one`."""

    capacity: int
    code: str = "overloaded"
    admitted: int = 0
    refused: int = 0
    most_at_once: int = 0
    running: int = 0
    _done: trio.MemorySendChannel[None] | None = None
    _wait: trio.MemoryReceiveChannel[None] | None = None

    def __attrs_post_init__(self) -> None:
        self._done, self._wait = trio.open_memory_channel[None](math.inf)

    async def attempt(self, _peer: Any) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        if self.running >= self.capacity:
            self.refused += 1
            return {"success": False, "error": "full", "code": self.code}
        self.running += 1
        self.admitted += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            assert self._wait is not None
            await self._wait.receive()
        finally:
            self.running -= 1
        return {"success": True}

    def finish_one(self) -> None:
        assert self._done is not None
        self._done.send_nowait(None)


async def _run_all(peer: _Peer, full: _FullAt, count: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    async def one() -> None:
        results.append(await take_turn(peer, full.attempt))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
        for _ in range(count):
            await trio.testing.wait_all_tasks_blocked()
            full.finish_one()
    return results


@pytest.mark.parametrize("code", ["overloaded", "too_many_streams"])
async def test_more_attempts_than_the_connection_takes_all_succeed_in_turn(code: str) -> None:
    full = _FullAt(capacity=3, code=code)
    with trio.fail_after(10):
        results = await _run_all(_Peer(), full, 12)
    assert results == [{"success": True}] * 12
    assert full.most_at_once == 3
    # The 9 over capacity are each refused once when they all start; then each
    # end lets one waiter go, and it is admitted: no stampede of retries.
    assert full.refused == 9, full.refused


async def test_a_refusal_while_nothing_else_runs_is_returned_as_it_is() -> None:
    calls = 0

    async def refused(_peer: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await trio.lowlevel.checkpoint()
        return {"success": False, "error": "server-wide limit", "code": "overloaded"}

    with trio.fail_after(10):
        result = await take_turn(_Peer(), refused)
    assert result["code"] == "overloaded" and calls == 1


@pytest.mark.parametrize("refusal", [SERVER_BUDGET_REFUSAL, USER_BUDGET_REFUSAL])
async def test_a_refusal_by_the_servers_call_memory_is_waited_out_within_a_bound(
    autojump_clock: trio.testing.MockClock, refusal: str
) -> None:
    """Others' calls hold that room (the server's, or our user's share of
    it), and nothing of ours on this connection frees it: tried again after
    pauses (0.05 s, doubling to 1 s, each jittered by half) while it lasts,
    until BUDGET_PATIENCE seconds after the first refusal, however long each
    try takes."""
    asked: list[float] = []

    def refusing_until(
        free_at: float, taking: float = 0.0
    ) -> Callable[[Any], Awaitable[dict[str, Any]]]:
        async def attempt(_peer: Any) -> dict[str, Any]:
            await trio.sleep(taking)
            asked.append(trio.current_time())
            if trio.current_time() >= free_at:
                return {"success": True}
            return {"success": False, "error": refusal, "code": "overloaded"}

        return attempt

    start = trio.current_time()
    assert await take_turn(_Peer(), refusing_until(start + 2.0)) == {"success": True}
    pauses = [b - a for a, b in itertools.pairwise(asked)]
    doubling = [0.05 * 2**n for n in range(len(pauses))]
    assert len(pauses) >= 4
    assert all(
        min(p, 1.0) / 2 <= pause <= min(p, 1.0) * 1.5
        for pause, p in zip(pauses, doubling, strict=True)
    )
    for taking in (0.0, 2.0):
        asked.clear()
        start = trio.current_time()
        result = await take_turn(_Peer(), refusing_until(math.inf, taking))
        assert result["code"] == "overloaded"
        # From the first refusal (one try in), to the end of the last try.
        elapsed = trio.current_time() - start
        assert BUDGET_PATIENCE - 1e-6 <= elapsed <= BUDGET_PATIENCE + 2 * taking + 1e-6


async def test_our_users_transfer_limit_held_by_ours_here_waits_for_one_of_ours(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The server refuses for our user's transfers (``max_transfers_per_user``)
    while one of ours runs on this connection (a user limit below the
    connection's): that one ending frees a slot, so the refused one waits for
    it, however long it takes, as for a full connection. Taken for a budget
    others hold, it was given up on BUDGET_PATIENCE seconds after the first
    refusal (a review, 2026-12-07). With none of ours running, the refusal
    is waited out as the budgets' are (the test above)."""
    slots = TransferSlots()
    limits = TransferLimits(per_connection=32, per_owner=1, total=100)
    peer = _Peer()

    def transfer(lasting: float) -> Callable[[Any], Awaitable[dict[str, Any]]]:
        async def attempt(_peer: Any) -> dict[str, Any]:
            await trio.lowlevel.checkpoint()
            try:
                slot = slots.claim(peer.connection, "user:u", limits)
            except RPCError as refused:
                return {"success": False, "error": str(refused), "code": refused.code}
            with slot:
                await trio.sleep(lasting)
            return {"success": True, "lasting": lasting}

        return attempt

    results: list[dict[str, Any]] = []

    async def run(lasting: float) -> None:
        results.append(await take_turn(peer, transfer(lasting)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 3 * BUDGET_PATIENCE)
        await trio.sleep(0.01)
        nursery.start_soon(run, 0.1)
    assert results == [
        {"success": True, "lasting": 3 * BUDGET_PATIENCE},
        {"success": True, "lasting": 0.1},
    ]


async def test_our_users_transfer_limit_freed_by_its_other_connection_is_taken_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same refusal, while one long transfer of ours runs here, and the
    user's other connection frees a slot half a second later: taken then, not
    when ours ends a minute later (the second review of 2026-12-07)."""
    peer = _Peer()
    others_hold_it = True

    async def ours(_peer: Any) -> dict[str, Any]:
        await trio.sleep(60)
        return {"success": True}

    async def second(_peer: Any) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        if others_hold_it:
            return {"success": False, "code": "overloaded", "error": USER_TRANSFERS_REFUSAL}
        return {"success": True}

    async def other_connection_frees() -> None:
        nonlocal others_hold_it
        await trio.sleep(0.5)
        others_hold_it = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take_turn, peer, ours)
        nursery.start_soon(other_connection_frees)
        await trio.sleep(0.01)
        started = trio.current_time()
        assert await take_turn(peer, second) == {"success": True}
        assert trio.current_time() - started < 2.0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("ours_running", [False, True])
async def test_our_users_reservations_at_their_limit_are_waited_out(
    autojump_clock: trio.testing.MockClock, ours_running: bool
) -> None:
    """The server refuses an upload because our user's uploads in progress
    reserve all the disk space one user may (``max_reserved_per_user``), and
    the room comes back 5 s later (one of them, on another connection, ends):
    the upload is tried again and taken then, whether or not one of ours runs
    on this connection (one that runs 3 x BUDGET_PATIENCE does not make it
    wait that long, nor give up)."""
    peer = _Peer()
    started = trio.current_time()

    async def ours(_peer: Any) -> dict[str, Any]:
        await trio.sleep(3 * BUDGET_PATIENCE)
        return {"success": True}

    async def refused_for_5_s(_peer: Any) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        if trio.current_time() - started < 5.0:
            error = f"{USER_RESERVATION_REFUSAL} (limit 1024 bytes)"
            return {"success": False, "code": "overloaded", "error": error}
        return {"success": True}

    async with trio.open_nursery() as nursery:
        if ours_running:
            nursery.start_soon(take_turn, peer, ours)
            await trio.sleep(0.01)
        assert await take_turn(peer, refused_for_5_s) == {"success": True}
        assert trio.current_time() - started < 7.0
        nursery.cancel_scope.cancel()


async def test_other_failures_are_returned_at_once() -> None:
    full = _FullAt(capacity=1)
    peer = _Peer()

    async def missing(_peer: Any) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"success": False, "error": "no such file", "code": "not_found"}

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take_turn, peer, full.attempt)
            await trio.testing.wait_all_tasks_blocked()
            assert (await take_turn(peer, missing))["code"] == "not_found"
            full.finish_one()


async def test_waiters_all_try_again_when_the_last_of_ours_ends_refused() -> None:
    """Waiters wait for something of ours to end; when everything of ours has
    ended in refusals (another client holds a server-wide limit), they try once
    more and get the refusal, rather than wait for ever."""
    peer = _Peer()
    gate = trio.Event()
    refusals = 0

    async def slow_refusal(_peer: Any) -> dict[str, Any]:
        nonlocal refusals
        await gate.wait()
        refusals += 1
        return {"success": False, "error": "full", "code": "overloaded"}

    results: list[dict[str, Any]] = []

    async def one() -> None:
        results.append(await take_turn(peer, slow_refusal))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert [r["code"] for r in results] == ["overloaded"] * 5
    assert refusals <= 10, refusals


async def test_a_waiter_cancelled_in_line_keeps_no_one_else_waiting() -> None:
    full = _FullAt(capacity=1)
    peer = _Peer()
    results: list[dict[str, Any]] = []

    async def one() -> None:
        results.append(await take_turn(peer, full.attempt))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
            with trio.CancelScope() as impatient:
                nursery.start_soon(one)  # waits behind the first
                await trio.testing.wait_all_tasks_blocked()
                impatient.cancel()
            async with trio.open_nursery() as mine:
                cancelled = trio.CancelScope()

                async def give_up() -> None:
                    with cancelled:
                        await take_turn(peer, full.attempt)

                mine.start_soon(give_up)
                await trio.testing.wait_all_tasks_blocked()
                cancelled.cancel()  # leaves the line before its turn
            nursery.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(3):
                full.finish_one()
                await trio.testing.wait_all_tasks_blocked()
    assert results == [{"success": True}] * 3
    assert full.admitted == 3


async def test_a_new_attempt_queues_behind_those_waiting() -> None:
    full = _FullAt(capacity=1)
    peer = _Peer()
    order: list[str] = []

    async def one(label: str) -> None:
        await take_turn(peer, full.attempt)
        order.append(label)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(one, "refused, waits")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(one, "came later")
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(3):
                full.finish_one()
                await trio.testing.wait_all_tasks_blocked()
    assert order == ["first", "refused, waits", "came later"]
    # The late one never tried while someone waited: one refusal in all.
    assert full.refused == 1


async def test_a_pool_that_starts_its_next_job_at_each_end_does_not_overtake_a_waiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two workers drain 40 jobs back to back on a connection that takes two;
    one more transfer arrives meanwhile. Each end wakes it, and the worker
    whose job ended queues behind it (until the woken one runs again, the
    line counts it as waiting): it ends after at most the jobs running when
    it arrived and one more, not last, and is refused once, or twice when
    its refusal crossed an end on the way."""
    peer = _Peer()
    running = 0
    finished: list[str] = []
    refused_late = 0

    def attempt_for(label: str) -> Callable[[Any], Awaitable[dict[str, Any]]]:
        async def attempt(_peer: Any) -> dict[str, Any]:
            nonlocal running, refused_late
            await trio.lowlevel.checkpoint()
            if running >= 2:
                refused_late += label == "late"
                return {"success": False, "error": "full", "code": "overloaded"}
            running += 1
            try:
                await trio.sleep(0.001)
            finally:
                running -= 1
            finished.append(label)
            return {"success": True}

        return attempt

    jobs = iter(range(40))

    async def worker() -> None:
        for job in jobs:
            await take_turn(peer, attempt_for(f"job{job}"))

    arrived_after = 0

    async def late() -> None:
        nonlocal arrived_after
        await trio.sleep(0.0105)  # while the pool runs its eleventh pair of jobs
        arrived_after = len(finished)
        assert (await take_turn(peer, attempt_for("late")))["success"]

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            nursery.start_soon(worker)
            nursery.start_soon(late)
    overtaken_by = finished.index("late") - arrived_after
    assert 0 < arrived_after < 30, arrived_after
    assert overtaken_by <= 3 and 1 <= refused_late <= 2, (overtaken_by, refused_late, finished)


async def test_a_refusal_that_crossed_an_end_on_its_way_asks_again_at_once() -> None:
    """The connection refused B while A ran; A ended (its last bytes came)
    before B's refusal did, so nothing of ours runs any more: B asks again
    rather than returning a refusal the room A left would have lifted."""
    peer = _Peer()
    holding = False
    a_done, release_a = trio.Event(), trio.Event()
    tries = 0

    async def a(_peer: Any) -> dict[str, Any]:
        nonlocal holding
        holding = True
        await release_a.wait()
        holding = False
        return {"success": True}

    async def b(_peer: Any) -> dict[str, Any]:
        nonlocal tries
        tries += 1
        if holding:
            release_a.set()
            await a_done.wait()  # the refusal arrives after A's end
            return {"success": False, "error": "full", "code": "overloaded"}
        await trio.lowlevel.checkpoint()
        return {"success": True}

    async def run_a() -> None:
        await take_turn(peer, a)
        a_done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_a)
            await trio.testing.wait_all_tasks_blocked()
            assert (await take_turn(peer, b))["success"]
    assert tries == 2


async def test_lines_are_per_connection() -> None:
    full = _FullAt(capacity=1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take_turn, _Peer(), full.attempt)
            await trio.testing.wait_all_tasks_blocked()
            # Another connection has nothing of ours running: its refusal stands.
            assert (await take_turn(_Peer(), full.attempt))["code"] == "overloaded"
            full.finish_one()


# --------------------------------------------------------------------------- end to end


async def _files(directory: Path, count: int, size: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"f{index}.bin" for index in range(count)]
    for path in paths:
        await make_file(path, size)
    return paths


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_more_transfers_at_once_than_the_server_takes_all_succeed(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two slots per connection, ten uploads and then ten downloads at once
    (files above the small-file limit: each its own begin and stream)."""
    transfer = FileTransferHandler(storage_dir=tmp_path / "server", max_transfers_per_connection=2)
    server = await server_factory(register=transfer.register_server_handlers)
    client: Client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "client")
    paths = await _files(tmp_path / "mine", 10, MiB)
    calls = record_calls(monkeypatch)
    results: list[dict[str, Any]] = []

    async def upload(path: Path) -> None:
        results.append(await local.send_to_server(client, path))

    async def download(path: Path) -> None:
        results.append(await local.receive_from_server(client, path.name, tmp_path / "back"))

    with trio.fail_after(60):
        for each in (upload, download):
            async with trio.open_nursery() as nursery:
                for path in paths:
                    nursery.start_soon(each, path)
    assert [r.get("code") for r in results if not r["success"]] == []
    assert len(results) == 20
    for path in paths:
        assert _digest(transfer.storage_dir / path.name) == _digest(path)
        assert _digest(tmp_path / "back" / path.name) == _digest(path)
    # Each over the limit was refused about once: a turn per end, no stampede.
    assert 10 < calls.count("file_upload_begin") <= 20, calls.count("file_upload_begin")
    assert 10 < calls.count("file_download") <= 20, calls.count("file_download")


async def _download_all_at_once(client: Client, paths: list[Path], tmp_path: Path) -> None:
    """Download every one of ``paths`` (by name) at once into ``tmp_path/back``;
    each must arrive whole."""
    local = FileTransferHandler(storage_dir=tmp_path / "client")
    results: list[dict[str, Any]] = []

    async def download(path: Path) -> None:
        results.append(await local.receive_from_server(client, path.name, tmp_path / "back"))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for path in paths:
                nursery.start_soon(download, path)
    assert [r.get("code") for r in results if not r["success"]] == []
    for path in paths:
        assert _digest(tmp_path / "back" / path.name) == _digest(path)


async def test_a_small_upload_refused_for_the_servers_call_memory_waits_for_room(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another client's call holds the server's call memory (1 MiB): a 64 KiB
    file, uploaded in one call that counts against it, is refused at first
    and stored once that call ends (before: refused 'overloaded' for good)."""
    released = trio.Event()
    transfer = FileTransferHandler(storage_dir=tmp_path / "server")

    def register(server: Server) -> None:
        transfer.register_server_handlers(server)

        async def hold(items: list[str]) -> int:
            await released.wait()
            return len(items)

        server.register_rpc(hold, "hold")

    server = await server_factory(
        # Both clients come from one address, one user: its share out of the
        # way (a share as large, full at the same time, would speak first),
        # so that what the upload meets is the server's bound.
        register=register,
        server_call_budget=MiB,
        user_call_budget=2 * MiB,
    )
    memory = server._settings.call_memory
    assert memory is not None
    holder: Client = await client_factory(server)
    uploader: Client = await client_factory(server)
    (path,) = await _files(tmp_path / "mine", 1, 64 * 1024)
    calls = record_calls(monkeypatch)
    local = FileTransferHandler(storage_dir=tmp_path / "client")
    results: list[dict[str, Any]] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(holder.call, "hold", items=["ab"] * 20_000))
            await wait_until(lambda: memory.held > MiB)

            async def upload() -> None:
                results.append(await local.send_to_server(uploader, path))

            nursery.start_soon(upload)
            await trio.sleep(0.5)  # refused meanwhile, and asked again
            assert results == []
            released.set()
    assert [r["success"] for r in results] == [True], results
    assert _digest(transfer.storage_dir / path.name) == _digest(path)
    assert calls.count("file_upload_small") > 1


async def test_a_download_that_finds_a_slot_still_ending_waits_for_it(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """One slot; the server holds a served download's slot while its
    on_file_served runs (0.3 s), after the client has the file: the next
    download, woken by that end, waits for the slot on the server instead of
    being refused (its turn was lost to that moment)."""
    transfer = FileTransferHandler(storage_dir=tmp_path / "server", max_transfers_per_connection=1)

    @transfer.on_file_served
    async def audit(_client: Any, _name: str, _metadata: dict[str, Any]) -> None:
        await trio.sleep(0.3)

    server = await server_factory(register=transfer.register_server_handlers)
    client: Client = await client_factory(server)
    paths = await _files(transfer.storage_dir, 3, MiB)
    await _download_all_at_once(client, paths, tmp_path)


async def test_more_downloads_at_once_than_the_client_budget_holds_all_succeed(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """The client's own receive budget takes two windows: six downloads at once
    (each would have been refused ``too_many_streams`` by our own side)."""
    transfer = FileTransferHandler(storage_dir=tmp_path / "server")
    server = await server_factory(register=transfer.register_server_handlers)
    client: Client = await client_factory(
        server, receive_window=MiB, connection_receive_budget=2 * MiB
    )
    paths = await _files(transfer.storage_dir, 6, 3 * MiB)
    await _download_all_at_once(client, paths, tmp_path)


async def test_a_verdict_refused_by_the_call_limit_is_asked_again_not_the_upload(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``file_upload_finish`` refused ``overloaded`` (the server's
    ``max_concurrent_calls`` full: the call never ran) after the bytes were
    sent: the sender asks for the verdict again; the upload is neither begun
    again nor reported skipped."""
    transfer = FileTransferHandler(storage_dir=tmp_path / "server")
    refused: list[int | None] = []

    async def finish_once_refused(
        caller: Peer, stream_id: int | None = None, abandon: bool = False, key: str = ""
    ) -> dict[str, Any]:
        if not abandon and len(refused) < 2:
            refused.append(stream_id)
            raise RPCError("too many calls at once (limit 128)", "overloaded")
        answer: dict[str, Any] = await transfer._receiver.rpc_finish(
            caller, stream_id=stream_id, abandon=abandon, key=key
        )
        return answer

    server = await server_factory(
        register=register_replacing(transfer, "file_upload_finish", finish_once_refused)
    )
    client: Client = await client_factory(server)
    (path,) = await _files(tmp_path / "mine", 1, 2 * MiB)
    calls = record_calls(monkeypatch)
    with trio.fail_after(30):
        result = await FileTransferHandler().send_to_server(client, path)
    assert result["success"] is True and not result.get("skipped"), result
    assert len(refused) == 2 and calls.count("file_upload_begin") == 1, calls
    assert _digest(transfer.storage_dir / path.name) == _digest(path)


async def test_more_verdicts_than_sixteen_wait_while_their_finishes_are_refused(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
) -> None:
    """Twenty uploads end while every ``file_upload_finish`` is refused
    ``overloaded`` for a while: the receiver keeps a verdict per transfer
    slot (32), not 16, so each is there when asked again."""
    transfer = FileTransferHandler(storage_dir=tmp_path / "server")
    refusing = True

    async def finish_refused_for_a_while(
        caller: Peer, stream_id: int | None = None, abandon: bool = False, key: str = ""
    ) -> dict[str, Any]:
        if refusing and not abandon:
            raise RPCError("too many calls at once (limit 128)", "overloaded")
        answer: dict[str, Any] = await transfer._receiver.rpc_finish(
            caller, stream_id=stream_id, abandon=abandon, key=key
        )
        return answer

    server = await server_factory(
        register=register_replacing(transfer, "file_upload_finish", finish_refused_for_a_while),
        receive_window=MiB,  # twenty streams fit the receive budget at once
    )
    client: Client = await client_factory(server)
    paths = await _files(tmp_path / "mine", 20, 200 * 1024)
    received: list[str] = []

    @transfer.on_file_received
    def stored(_client: Any, name: str, _metadata: dict[str, Any]) -> None:
        received.append(name)

        if len(received) == len(paths):
            all_stored.set()

    all_stored = trio.Event()
    results: list[dict[str, Any]] = []

    async def upload(path: Path) -> None:
        results.append(await FileTransferHandler().send_to_server(client, path))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for path in paths:
                nursery.start_soon(upload, path)
            await all_stored.wait()
            refusing = False
    assert [r for r in results if not r["success"] or r.get("skipped")] == []


async def test_a_verdict_dropped_while_refused_is_the_refusal() -> None:
    """Asked again, the verdict is gone (``not_found``: the receiver kept no
    more): what the transfer gets is the refusal, which a retry of the whole
    transfer settles, not a ``not_found`` that would say the file is missing."""

    @attrs.define
    class _Answers:
        codes: list[str]

        async def call(self, _method: str, **_kwargs: Any) -> Any:
            await trio.lowlevel.checkpoint()
            code = self.codes.pop(0)
            raise RPCError(f"refused ({code})", code)

    with trio.fail_after(10), pytest.raises(RPCError) as refused:
        await _ask_verdict(_Answers(["overloaded", "not_found"]), "file_upload_finish", 3)  # type: ignore[arg-type]
    assert refused.value.code == "overloaded"
    with trio.fail_after(10), pytest.raises(RPCError) as missing:
        await _ask_verdict(_Answers(["not_found"]), "file_upload_finish", 3)  # type: ignore[arg-type]
    assert missing.value.code == "not_found"  # never refused: a real not_found


def test_under_asyncio_gathered_uploads_over_the_limit_all_succeed(tmp_path: Path) -> None:
    """The shim's callers get the same turns: ``asyncio.gather`` of eight uploads
    against one slot per connection."""

    async def main() -> list[dict[str, Any]]:
        server = Server(server_descriptor())
        transfer = FileTransferHandler(storage_dir=tmp_path / "server")
        transfer.max_transfers_per_connection = 1
        transfer.register_server_handlers(server)
        running = asyncio.create_task(server.run())
        try:
            for _ in range(500):  # 5 s at most
                if server.is_running:
                    break
                await asyncio.sleep(0.01)
            client = Client(client_descriptor(server.port))
            await client.connect()
            local = FileTransferHandler(storage_dir=tmp_path / "client")
            try:
                return await asyncio.wait_for(
                    asyncio.gather(*(local.send_to_server(client, p) for p in paths)), 60
                )
            finally:
                await client.disconnect()
        finally:
            await server.close()
            await running

    paths = [tmp_path / f"a{index}.bin" for index in range(8)]
    for index, path in enumerate(paths):
        path.write_bytes(bytes([index]) * (MiB // 2 + index))
    results = asyncio.run(main())
    assert [r.get("code") for r in results if not r["success"]] == []
    for path in paths:
        assert (tmp_path / "server" / path.name).read_bytes() == path.read_bytes()
