"""The per-connection transfer limit: a claimed slot comes back on every path.

First :class:`~conduit.transfer._slots.TransferSlot` itself, driven with a real
Trio nursery as its spawner (success, failure, cancellation before and during
the task, a spawner that refuses); then the handler end to end over loopback
with ``max_transfers_per_connection = 1``, where a leaked slot would make the
next transfer on the same connection fail with ``overloaded``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from conduit import Client, FileTransferHandler, RPCError, Server
from conduit.transfer._slots import (
    ENDING_WAIT,
    SERVER_TRANSFERS_REFUSAL,
    USER_TRANSFERS_REFUSAL,
    TransferLimits,
    TransferSlot,
    TransferSlots,
)
from conduit.transfer._turns import BUDGET_REFUSALS
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


#: The owner the slot object's tests claim for.
OWNER = "host:127.0.0.1"


def per_connection(limit: int) -> TransferLimits:
    """Limits where only the connection's counts: its owner and the handler have room."""
    return TransferLimits(per_connection=limit, per_owner=1000, total=1000)


# --------------------------------------------------------------------------- the slot object


async def test_claims_up_to_the_limit_then_refuses_overloaded() -> None:
    slots, key = TransferSlots(), _Key()
    first = slots.claim(key, OWNER, per_connection(2))
    slots.claim(key, OWNER, per_connection(2))
    with pytest.raises(RPCError) as refused:
        slots.claim(key, OWNER, per_connection(2))
    assert refused.value.code == "overloaded"
    assert slots.in_use(key) == 2
    first.release()
    first.release()  # a second release gives nothing more back
    assert slots.in_use(key) == 1
    assert slots.in_use(_Key()) == 0  # counted per connection


async def test_a_claim_waits_for_a_slot_that_is_ending_not_for_one_under_way() -> None:
    slots, key = TransferSlots(), _Key()
    running = slots.claim(key, OWNER, per_connection(1))
    with pytest.raises(RPCError) as refused:
        await slots.claim_after_ending(key, OWNER, per_connection(1))  # under way: refused at once
    assert refused.value.code == "overloaded"
    running.ending()
    claimed = await _claimed_once_released(slots, key, 1, running)
    assert slots.in_use(key) == 1
    claimed.release()
    assert slots.in_use(key) == 0
    # An ending slot given back is no longer counted as ending: with a slot
    # under way again, a claim is refused at once.
    again = slots.claim(key, OWNER, per_connection(1))
    with trio.fail_after(1), pytest.raises(RPCError):
        await slots.claim_after_ending(key, OWNER, per_connection(1))
    again.release()


async def test_any_slot_given_back_lets_a_waiting_claim_in() -> None:
    """Two slots: one ending, one under way. The one under way comes back
    first (an upload, a batch): the waiting claim takes it at once, without
    waiting for the ending one."""
    slots, key = TransferSlots(), _Key()
    ending, under_way = (
        slots.claim(key, OWNER, per_connection(2)),
        slots.claim(key, OWNER, per_connection(2)),
    )
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
        claimed.append(await slots.claim_after_ending(key, OWNER, per_connection(limit)))

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
    slots.claim(key, OWNER, per_connection(1)).ending()
    started = trio.current_time()
    with trio.fail_after(2 * ENDING_WAIT), pytest.raises(RPCError) as refused:
        await slots.claim_after_ending(key, OWNER, per_connection(1))
    assert refused.value.code == "overloaded"
    assert trio.current_time() - started == pytest.approx(ENDING_WAIT)


async def test_leaving_the_block_without_a_spawn_releases() -> None:
    slots, key = TransferSlots(), _Key()
    with slots.claim(key, OWNER, per_connection(1)) as slot:
        assert held(slot) and slots.in_use(key) == 1
    assert not held(slot) and slots.in_use(key) == 0


async def test_a_failure_before_the_spawn_releases() -> None:
    slots, key = TransferSlots(), _Key()
    with pytest.raises(OSError, match="disk on fire"), slots.claim(key, OWNER, per_connection(1)):
        raise OSError("disk on fire")
    assert slots.in_use(key) == 0


async def test_a_cancellation_before_the_spawn_releases() -> None:
    slots, key = TransferSlots(), _Key()
    with trio.CancelScope() as scope, slots.claim(key, OWNER, per_connection(1)):
        scope.cancel()
        await trio.sleep_forever()
    assert scope.cancelled_caught
    assert slots.in_use(key) == 0


async def test_the_spawned_task_owns_the_slot_until_it_returns() -> None:
    slots, key = TransferSlots(), _Key()
    go = trio.Event()
    async with trio.open_nursery() as nursery:
        with slots.claim(key, OWNER, per_connection(1)) as slot:
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
            with slots.claim(key, OWNER, per_connection(1)) as slot:
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
        with slots.claim(key, OWNER, per_connection(1)) as slot:
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
    with pytest.raises(RuntimeError), slots.claim(key, OWNER, per_connection(1)) as slot:
        slot.spawn(closed.start_soon, trio.sleep_forever)
    assert slots.in_use(key) == 0


async def test_an_owner_and_all_connections_together_are_bounded_too() -> None:
    """Three limits: a connection's, its owner's over all its connections, and
    the handler's over all; each refusal says which (the client waits out the
    two wider ones, since other connections hold them), and a slot given back
    counts in all three."""
    slots = TransferSlots()
    limits = TransferLimits(per_connection=2, per_owner=3, total=4)
    first, second, third = _Key(), _Key(), _Key()
    held = [slots.claim(first, "a", limits), slots.claim(first, "a", limits)]
    held.append(slots.claim(second, "a", limits))
    with pytest.raises(RPCError) as by_owner:
        slots.claim(second, "a", limits)  # its connection has room; its owner has none
    assert by_owner.value.code == "overloaded"
    assert USER_TRANSFERS_REFUSAL in str(by_owner.value) and "(limit 3)" in str(by_owner.value)
    held.append(slots.claim(third, "b", limits))
    with pytest.raises(RPCError) as by_server:
        slots.claim(third, "b", limits)  # "b" holds 1 of 3, the server 4 of 4
    assert by_server.value.code == "overloaded"
    assert SERVER_TRANSFERS_REFUSAL in str(by_server.value)
    assert any(refusal in str(by_server.value) for refusal in BUDGET_REFUSALS)
    assert any(refusal in str(by_owner.value) for refusal in BUDGET_REFUSALS)
    assert (slots.owned_by("a"), slots.owned_by("b"), slots.total) == (3, 1, 4)
    held[2].release()
    # Room for "a" again on any of its connections, and for the server.
    slots.claim(third, "a", limits).release()
    for slot in held:
        slot.release()
    assert (slots.owned_by("a"), slots.owned_by("b"), slots.total) == (0, 0, 0)
    assert not slots._by_owner  # an owner with nothing held is not kept


def test_the_default_limits_follow_the_descriptor_limit(tmp_path: Path) -> None:
    """By default transfers hold at most half of the process's descriptors (a
    quarter of the soft limit in transfers of two each), one owner a quarter of
    that, read when a transfer starts (``conduit serve`` raises the limit after
    the handler is made); explicit settings win. Checked in a child process,
    whose limit may be lowered without touching the test run's."""
    script = textwrap.dedent(
        """
        import resource
        import sys
        from conduit import FileTransferHandler
        handler = FileTransferHandler(storage_dir=sys.argv[1])
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        low = handler.transfer_limits()
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
        raised = handler.transfer_limits()
        handler.max_transfers = 10
        explicit = handler.transfer_limits()
        handler.max_transfers_per_user = 7
        both = handler.transfer_limits()
        print(low.total, low.per_owner, raised.total, raised.per_owner,
              explicit.total, explicit.per_owner, both.per_owner, both.per_connection)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "storage")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["256", "64", "512", "128", "10", "2", "7", "32"]


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_transfers", 0),
        ("max_transfers_per_user", -1),
        ("max_transfers", "8"),
        ("max_reserved_per_user", -1),
        ("max_reserved_per_user", 1.5),
    ],
)
def test_transfer_limits_are_checked(setting: str, value: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=setting):
        FileTransferHandler(storage_dir=tmp_path, **{setting: value})


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
