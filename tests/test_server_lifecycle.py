"""Server lifecycle: run(), close(), wait_listening() at the awkward moments.

A close() from inside an RPC handler or cancelled midway, a close() before
the server listens, two run() calls at once, a run() that fails before it
listens (what wait_listening() says, whether the port stays bound). Real
loopback sockets throughout: binding, refusing and releasing a port is the
point. Every wait is bounded, so a regression fails rather than hangs.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from conduit import Client, Server
from conftest import LOOPBACK, ClientFactory, client_descriptor, server_descriptor, wait_until


@pytest.fixture
def blocker() -> Iterator[socket.socket]:
    """A plain socket listening on a loopback port: a server there fails to bind."""
    with socket.socket() as held:
        held.bind((LOOPBACK, 0))
        held.listen()
        yield held


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def accepts_connections(port: int) -> bool:
    """Whether something listens on loopback ``port`` (a leaked listener does)."""
    with socket.socket() as probe:
        try:
            probe.connect((LOOPBACK, port))
        except ConnectionRefusedError:
            return False
        return True


def hold_in_prepare(server: Server) -> trio.Event:
    """Make ``server``'s run() wait in its preparation (the password stretch) for ever.

    A stand-in for a slow Argon2id stretch, without the timing: the run has
    bound its port and sits there until cancelled. The event is set once it does.
    """
    preparing = trio.Event()

    async def prepare() -> None:
        preparing.set()
        await trio.sleep_forever()

    server._gate.prepare = prepare  # type: ignore[method-assign]
    return preparing


class RunOutcome:
    """What a run() in the background did: ended (and how), reported its port."""

    def __init__(self) -> None:
        self.ended = trio.Event()
        self.error: BaseException | None = None

    async def run(self, server: Server) -> None:
        try:
            await server.run()
        except Exception as exc:
            self.error = exc
        finally:
            self.ended.set()


# --- bug 2: close() from a handler


def register_shutdown(server: Server, outcome: list[str], *, shield: bool = False) -> None:
    """A ``shutdown`` RPC whose handler awaits ``server.close()`` (shielded if asked)."""

    @server.rpc
    async def shutdown() -> str:
        # Bounded even when shielded: a close() waiting for its own connection
        # makes the test fail instead of hang.
        with trio.CancelScope(shield=shield, deadline=trio.current_time() + 5) as scope:
            await server.close("shut down by RPC")
        outcome.append("close() timed out" if scope.cancelled_caught else "close() returned")
        return "bye"


async def test_close_from_an_rpc_handler_ends_the_run(
    tcp_client_factory: ClientFactory,
) -> None:
    server = Server(server_descriptor())
    outcome: list[str] = []
    register_shutdown(server, outcome)
    ran = RunOutcome()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ran.run, server)
        with trio.fail_after(10):
            port = await server.wait_listening()
            client = await tcp_client_factory(port, reconnect_enabled=False)
            # The handler's close() returns at once (the run cannot end before
            # the handler has), so the caller gets its answer.
            assert await client.call("shutdown") == "bye"
            await ran.ended.wait()
    assert ran.error is None
    assert outcome == ["close() returned"]
    assert not server.is_running
    assert not accepts_connections(port)


async def test_close_from_a_shielded_handler_does_not_wait_for_its_own_connection(
    tcp_client_factory: ClientFactory,
) -> None:
    # Waiting for run() to end from a task run() waits for is a deadlock,
    # whether or not a cancel could break it.
    server = Server(server_descriptor())
    outcome: list[str] = []
    register_shutdown(server, outcome, shield=True)
    ran = RunOutcome()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ran.run, server)
        with trio.fail_after(10):
            port = await server.wait_listening()
            client = await tcp_client_factory(port, reconnect_enabled=False)
            nursery.start_soon(client.call, "shutdown")
            await ran.ended.wait()
    assert outcome == ["close() returned"]
    assert not server.is_running


async def test_a_cancelled_close_still_stops_the_server(
    tcp_client_factory: ClientFactory,
) -> None:
    server = Server(server_descriptor())
    ran = RunOutcome()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ran.run, server)
        with trio.fail_after(10):
            port = await server.wait_listening()
            client = await tcp_client_factory(port, reconnect_enabled=False)
            await wait_until(lambda: client.id in server.clients)
            with trio.move_on_after(0):  # cancelled at its first checkpoint
                await server.close()
            await ran.ended.wait()
    assert ran.error is None
    assert not server.is_running
    assert not accepts_connections(port)


async def test_close_from_a_sibling_of_the_run_waits_for_the_goodbyes(
    tcp_client_factory: ClientFactory,
) -> None:
    """A task beside ``await server.run()`` in the caller's nursery is not part of
    the run: its close() waits, so the clients get their goodbye before the
    nursery is cancelled."""
    server = Server(server_descriptor())
    closed: list[bool] = []

    async def stopper() -> None:
        port = await server.wait_listening()
        client = await tcp_client_factory(port, reconnect_enabled=False)
        await wait_until(lambda: client.id in server.clients)
        stopping.append(client)
        await server.close("bye from a sibling")
        closed.append(server.is_running)
        nursery.cancel_scope.cancel()

    stopping: list[Client] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stopper)
            await server.run()
        await stopping[0].wait_closed()
    assert closed == [False]  # close() returned once the run had stopped
    connection = stopping[0]._peer.connection  # type: ignore[union-attr]
    assert connection.close_reason == "peer closed the connection: bye from a sibling"


def test_close_from_an_asyncio_rpc_handler_ends_the_run() -> None:
    outcome: list[str] = []

    async def main() -> None:
        server = Server(server_descriptor())

        @server.rpc
        async def shutdown() -> str:
            await server.close()
            outcome.append("close() returned")
            return "bye"

        serving = asyncio.create_task(server.run())
        port = await asyncio.wait_for(server.wait_listening(), 10)
        client = Client(client_descriptor(port, reconnect_enabled=False))
        await client.connect()
        try:
            # The asyncio handler's close() runs in a task of the guest run,
            # on behalf of the handler's own (one of the run's): it returns at
            # once, as from a Trio handler, and the caller gets its answer.
            assert await asyncio.wait_for(client.call("shutdown"), 10) == "bye"
            try:
                await asyncio.wait_for(asyncio.shield(serving), 10)
            except TimeoutError:
                serving.cancel()
                pytest.fail("server.run() still runs after close() in a handler")
            assert not server.is_running
        finally:
            await client.disconnect()

    asyncio.run(main())
    assert outcome == ["close() returned"]


# --- bug 3: close() early, two runs


@pytest.mark.parametrize("when", ["at_once", "while_preparing"])
async def test_close_before_listening_stops_the_run(when: str) -> None:
    server = Server(server_descriptor())
    preparing = hold_in_prepare(server)
    ran = RunOutcome()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ran.run, server)
        with trio.fail_after(10):
            # At once: run() has not taken its first step yet.
            if when == "while_preparing":
                await preparing.wait()
            await server.close()
            # close() waits for the run to end.
            assert ran.ended.is_set()
    assert ran.error is None
    assert not server.is_running


async def test_two_runs_at_once_the_second_fails_at_once() -> None:
    server = Server(server_descriptor())
    runs = [RunOutcome(), RunOutcome()]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for ran in runs:
                nursery.start_soon(ran.run, server)
            await server.wait_listening()
            errors = [ran.error for ran in runs if ran.ended.is_set()]
            assert len(errors) == 1
            assert isinstance(errors[0], RuntimeError)
            assert "already running" in str(errors[0])
            await server.close()
    assert not server.is_running


# --- bug 4: wait_listening() after a failure


async def test_wait_listening_raises_when_run_fails_then_waits_for_the_next_run(
    blocker: socket.socket,
) -> None:
    busy_port = port_of(blocker)
    server = Server(server_descriptor(port=busy_port))
    failed = RunOutcome()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            nursery.start_soon(failed.run, server)
            with pytest.raises(RuntimeError, match="stopped before listening") as info:
                await server.wait_listening()
            cause = info.value.__cause__
            assert isinstance(cause, OSError) and isinstance(failed.error, OSError)
            # The run's own error, as a detached copy (no traceback, which
            # would hold the server: see conduit._stored_errors); run()
            # raised the original with its traceback.
            assert (cause.errno, cause.args) == (failed.error.errno, failed.error.args)
            assert cause.__traceback__ is None and failed.error.__traceback__ is not None
            del cause
    # The port is free again, and a new run binds it: a wait_listening()
    # made before that run has taken a step is about it, not the failure
    # already reported.
    blocker.close()
    ran = RunOutcome()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            nursery.start_soon(ran.run, server)
            assert await server.wait_listening() == busy_port
            await server.close()
    assert ran.error is None


async def test_wait_listening_after_a_failed_run_reports_it_once(
    blocker: socket.socket,
) -> None:
    server = Server(server_descriptor(port=port_of(blocker)))
    with trio.fail_after(10):
        with pytest.raises(OSError):
            await server.run()
        # Nobody was waiting: the next call hears of it...
        with pytest.raises(RuntimeError, match="stopped before listening"):
            await server.wait_listening()
        # ... and the one after waits for the next run.
        assert not server._startup.over.is_set()


def test_wait_listening_raises_under_asyncio_when_run_fails(blocker: socket.socket) -> None:
    busy_port = port_of(blocker)

    async def main() -> None:
        server = Server(server_descriptor(port=busy_port))
        serving = asyncio.create_task(server.run())
        try:
            with pytest.raises(RuntimeError, match="stopped before listening") as info:
                await asyncio.wait_for(server.wait_listening(), 10)
            assert isinstance(info.value.__cause__, OSError)
            with pytest.raises(OSError):
                await serving
        finally:
            serving.cancel()
        # Then, the port free again, a run that succeeds.
        blocker.close()
        serving = asyncio.create_task(server.run())
        assert await asyncio.wait_for(server.wait_listening(), 10) == busy_port
        await server.close()
        await asyncio.wait_for(serving, 10)

    asyncio.run(main())


# --- bug 5: listeners of a failed run


async def test_listeners_closed_when_preparation_fails(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.json"
    accounts.write_text("not json {")
    bound: list[int] = []
    server = Server(server_descriptor(password=None, accounts=str(accounts)))
    real_prepare = server._gate.prepare

    async def prepare() -> None:
        bound.append(server.port)  # bound by now: the port to probe afterwards
        await real_prepare()

    server._gate.prepare = prepare  # type: ignore[method-assign]
    with trio.fail_after(10):
        with pytest.raises(ValueError, match="accounts") as info:
            await server.run()
    # Probed while the error is still held, as a caller's handler would: its
    # traceback keeps the run's frames, and their listeners, alive.
    assert info.value.__traceback__ is not None
    assert not accepts_connections(bound[0])
    assert not server.is_running


async def test_listeners_closed_when_cancelled_while_preparing() -> None:
    server = Server(server_descriptor())
    preparing = hold_in_prepare(server)
    ran = RunOutcome()
    with warnings.catch_warnings(record=True) as caught:
        # A listener nobody closed is only closed by the garbage collector,
        # with a ResourceWarning: while anything holds the run's frames (a
        # kept traceback), its port stays bound.
        warnings.simplefilter("always", ResourceWarning)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ran.run, server)
                await preparing.wait()
                port = server.port
                assert accepts_connections(port)
                nursery.cancel_scope.cancel()
        gc.collect()
    assert not accepts_connections(port)
    # Only this port's: the collector may find other tests' garbage too.
    leaked = [
        str(w.message)
        for w in caught
        if issubclass(w.category, ResourceWarning) and f"{LOOPBACK}', {port})" in str(w.message)
    ]
    assert not leaked


async def test_given_listeners_closed_when_closed_before_serving() -> None:
    server = Server(server_descriptor())
    hold_in_prepare(server)
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = int(listeners[0].socket.getsockname()[1])
    outcome: list[Any] = []

    async def serve() -> None:
        await server.serve(listeners)
        outcome.append("ended")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await trio.testing.wait_all_tasks_blocked()
            await server.close()
    assert outcome == ["ended"]
    assert not accepts_connections(port)
