"""The per-connection transfer limit: a claimed slot comes back on every path.

First :class:`~conduit.transfer._slots.TransferSlot` itself, driven with a real
Trio nursery as its spawner (success, failure, cancellation before and during
the task, a spawner that refuses); then the handler end to end over loopback
with ``max_transfers_per_connection = 1``, where a leaked slot would make the
next transfer on the same connection fail with ``overloaded``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from conduit import Client, FileTransferHandler, RPCError, Server
from conduit.transfer._slots import ENDING_WAIT, TransferSlot, TransferSlots
from conftest import ClientFactory, ServerFactory
from transfer_helpers import MiB, make_file


async def _file(path: Path, size: int) -> Path:
    await make_file(path, size)
    return path


def held(slot: TransferSlot) -> bool:
    """Whether the slot still counts against the limit (read afresh at each call)."""
    return slot.held


class _Key:
    """Stands for a connection: the slots only need a weakly referable key."""


# --------------------------------------------------------------------------- the slot object


async def test_claims_up_to_the_limit_then_refuses_overloaded() -> None:
    slots, key = TransferSlots(), _Key()
    first = slots.claim(key, 2)
    slots.claim(key, 2)
    with pytest.raises(RPCError) as refused:
        slots.claim(key, 2)
    assert refused.value.code == "overloaded"
    assert slots.in_use(key) == 2
    first.release()
    first.release()  # a second release gives nothing more back
    assert slots.in_use(key) == 1
    assert slots.in_use(_Key()) == 0  # counted per connection


async def test_a_claim_waits_for_a_slot_that_is_ending_not_for_one_under_way() -> None:
    slots, key = TransferSlots(), _Key()
    running = slots.claim(key, 1)
    with pytest.raises(RPCError) as refused:
        await slots.claim_after_ending(key, 1)  # under way: refused at once
    assert refused.value.code == "overloaded"
    running.ending()
    claimed = await _claimed_once_released(slots, key, 1, running)
    assert slots.in_use(key) == 1
    claimed.release()
    assert slots.in_use(key) == 0
    # An ending slot given back is no longer counted as ending: with a slot
    # under way again, a claim is refused at once.
    again = slots.claim(key, 1)
    with trio.fail_after(1), pytest.raises(RPCError):
        await slots.claim_after_ending(key, 1)
    again.release()


async def test_any_slot_given_back_lets_a_waiting_claim_in() -> None:
    """Two slots: one ending, one under way. The one under way comes back
    first (an upload, a batch): the waiting claim takes it at once, without
    waiting for the ending one."""
    slots, key = TransferSlots(), _Key()
    ending, under_way = slots.claim(key, 2), slots.claim(key, 2)
    ending.ending()
    await _claimed_once_released(slots, key, 2, under_way)
    assert ending.held


async def _claimed_once_released(
    slots: TransferSlots, key: _Key, limit: int, held: TransferSlot
) -> TransferSlot:
    """A ``claim_after_ending`` that waits while ``held`` is held, and gets a
    slot once it is given back."""
    claimed: list[TransferSlot] = []

    async def claim() -> None:
        claimed.append(await slots.claim_after_ending(key, limit))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(claim)
            await trio.testing.wait_all_tasks_blocked()
            assert claimed == []  # waiting
            held.release()
    assert len(claimed) == 1
    return claimed[0]


async def test_a_claim_waits_for_an_ending_slot_only_so_long(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An ending slot whose on_file_served never returns: the claim is refused
    ``overloaded`` after ENDING_WAIT, as a full connection's is."""
    slots, key = TransferSlots(), _Key()
    slots.claim(key, 1).ending()
    started = trio.current_time()
    with trio.fail_after(2 * ENDING_WAIT), pytest.raises(RPCError) as refused:
        await slots.claim_after_ending(key, 1)
    assert refused.value.code == "overloaded"
    assert trio.current_time() - started == pytest.approx(ENDING_WAIT)


async def test_leaving_the_block_without_a_spawn_releases() -> None:
    slots, key = TransferSlots(), _Key()
    with slots.claim(key, 1) as slot:
        assert held(slot) and slots.in_use(key) == 1
    assert not held(slot) and slots.in_use(key) == 0


async def test_a_failure_before_the_spawn_releases() -> None:
    slots, key = TransferSlots(), _Key()
    with pytest.raises(OSError, match="disk on fire"), slots.claim(key, 1):
        raise OSError("disk on fire")
    assert slots.in_use(key) == 0


async def test_a_cancellation_before_the_spawn_releases() -> None:
    slots, key = TransferSlots(), _Key()
    with trio.CancelScope() as scope, slots.claim(key, 1):
        scope.cancel()
        await trio.sleep_forever()
    assert scope.cancelled_caught
    assert slots.in_use(key) == 0


async def test_the_spawned_task_owns_the_slot_until_it_returns() -> None:
    slots, key = TransferSlots(), _Key()
    go = trio.Event()
    async with trio.open_nursery() as nursery:
        with slots.claim(key, 1) as slot:
            slot.spawn(nursery.start_soon, go.wait)
        assert slots.in_use(key) == 1  # the block is left, the task still holds it
        await trio.testing.wait_all_tasks_blocked()
        assert slots.in_use(key) == 1
        go.set()
    assert slots.in_use(key) == 0


async def test_a_spawned_task_that_fails_releases() -> None:
    slots, key = TransferSlots(), _Key()

    async def fail() -> None:
        await trio.lowlevel.checkpoint()
        raise ValueError("receiver broke")

    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="receiver broke")):
        async with trio.open_nursery() as nursery:
            with slots.claim(key, 1) as slot:
                slot.spawn(nursery.start_soon, fail)
    assert slots.in_use(key) == 0


@pytest.mark.parametrize("when", ["before it starts", "while it runs"])
async def test_a_cancelled_spawned_task_releases(when: str) -> None:
    slots, key = TransferSlots(), _Key()
    started = trio.Event()

    async def receive() -> None:
        await trio.lowlevel.checkpoint()  # where a cancellation already pending lands
        started.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        with slots.claim(key, 1) as slot:
            slot.spawn(nursery.start_soon, receive)
        if when == "before it starts":
            nursery.cancel_scope.cancel()  # the task has not run yet
        else:
            await started.wait()
            assert slots.in_use(key) == 1
            nursery.cancel_scope.cancel()
    assert started.is_set() == (when == "while it runs")
    assert slots.in_use(key) == 0


async def test_a_spawner_that_refuses_leaves_the_slot_to_the_block() -> None:
    slots, key = TransferSlots(), _Key()
    async with trio.open_nursery() as closed:
        pass  # a nursery that has closed refuses new tasks, like a closed connection
    with pytest.raises(RuntimeError), slots.claim(key, 1) as slot:
        slot.spawn(closed.start_soon, trio.sleep_forever)
    assert slots.in_use(key) == 0


# --------------------------------------------------------------------------- end to end


async def _one_slot_server(
    server_factory: ServerFactory, storage: Path, **options: Any
) -> tuple[Server, FileTransferHandler]:
    transfer = FileTransferHandler(storage_dir=storage, **options)
    transfer.max_transfers_per_connection = 1
    server = await server_factory(register=transfer.register_server_handlers)
    return server, transfer


async def test_each_finished_upload_gives_its_slot_back(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    server, _ = await _one_slot_server(server_factory, tmp_path / "server")
    client: Client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "client")
    with trio.fail_after(30):
        for index in range(3):
            path = await _file(tmp_path / f"f{index}.bin", 2 * MiB)
            result = await local.send_to_server(client, path)
            assert result["success"], result


async def test_a_refused_upload_gives_its_slot_back(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    server, _ = await _one_slot_server(server_factory, tmp_path / "server", max_file_size=MiB)
    client: Client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "client")
    with trio.fail_after(30):
        refused = await local.send_to_server(client, await _file(tmp_path / "big.bin", 2 * MiB))
        assert refused["code"] == "too_large", refused
        fits = await local.send_to_server(client, await _file(tmp_path / "ok.bin", MiB // 2))
        assert fits["success"], fits


async def test_a_cancelled_upload_gives_its_slot_back(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    server, transfer = await _one_slot_server(server_factory, tmp_path / "server")
    client: Client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "client")
    path = await _file(tmp_path / "big.bin", 8 * MiB)
    with trio.fail_after(30):
        with trio.CancelScope() as scope:

            def cancel_once_moving(progress: Any) -> None:
                if progress.transferred > 0:
                    scope.cancel()

            await local.send_to_server(client, path, on_progress=cancel_once_moving)
        assert scope.cancelled_caught
        # The same file again: the server replaces the cancelled attempt, and
        # with one slot per connection it can only start if that slot came back.
        again = await local.send_to_server(client, path)
    assert again["success"], again
    assert (transfer.storage_dir / "big.bin").read_bytes() == path.read_bytes()


async def test_an_abandoned_begin_gives_its_slot_back(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """A sender that began and then never sent a byte (it dropped the upload)."""
    server, _ = await _one_slot_server(server_factory, tmp_path / "server")
    client: Client = await client_factory(server)
    args: dict[str, Any] = {"name": "dropped.bin", "size": 10, "key": "k" * 32}
    with trio.fail_after(30):
        first = await client.call("file_upload_begin", **args)
        # The retry of the same file supersedes the dropped attempt; its slot
        # must come back for the retry to be admitted.
        second = await client.call("file_upload_begin", **args)
        assert second["stream_id"] != first["stream_id"]
        with pytest.raises(RPCError) as superseded:
            await client.call("file_upload_finish", stream_id=first["stream_id"])
        assert superseded.value.code == "superseded"


async def test_downloads_refused_or_served_give_their_slot_back(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    server, transfer = await _one_slot_server(server_factory, tmp_path / "server")
    await _file(transfer.storage_dir / "one.bin", 2 * MiB)
    client: Client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "client")
    with trio.fail_after(30):
        missing = await local.receive_from_server(client, "missing.bin", tmp_path / "out")
        assert missing["code"] == "not_found", missing
        for _ in range(2):
            # Both on the same connection; the second starts only once the
            # first's serving task has ended and given its slot back.
            got = await _download_when_admitted(local, client, tmp_path / "out")
            assert got["success"], got


async def _download_when_admitted(
    local: FileTransferHandler, client: Client, out: Path
) -> dict[str, Any]:
    # The server's serving task gives the slot back just after its last frame,
    # which can be a moment after the client has the whole file: "overloaded"
    # then is that moment, not a leak (a leak would last until fail_after).
    while True:
        result = await local.receive_from_server(client, "one.bin", out)
        if result.get("code") != "overloaded":
            return result
        await trio.sleep(0.01)
