"""Errors raised from where they were kept leave no reference cycle behind.

An error kept by an object and raised later takes the frames it passes
through into its traceback, and a frame that holds the keeper closes a cycle
(keeper -> error -> traceback -> frame -> keeper) that only a full pass of
Python's cycle collector frees, holding whatever those frames reach (a whole
connection, its buffers) until then: see ``conduit._stored_errors``. Each test
here drives one site that keeps or raises such an error through its real
path (over loopback sockets; the cluster's against real Valkey and SeaweedFS,
as the cluster tests do) with the cycle collector off, and checks that no
cyclic garbage holds a frame, an exception, a ``Connection`` or a page
mapping. Each test's docstring names its site; each fails with that site's
fix reverted.

Garbage is looked for only once the server is done with what the test did
(the connection closed, the socket closed, the thread back): a frame still
running holds the cycle, which is not garbage yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import resource
import secrets
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from cluster_engines import S3Engine, seaweedfs, valkey
from conduit import (
    Accounts,
    AuthenticationError,
    Client,
    ClientDescriptor,
    ConnectionClosed,
    FileTransferHandler,
    Peer,
    RPCError,
    RPCTimeoutError,
    Server,
    ServerDescriptor,
    run_in_trio,
)
from conduit.cluster._push import PushRequest, deliver_staged
from conduit.cluster.bus import ClusterBus, RequestLost
from conduit.cluster.s3 import S3Store, make_s3_client
from conduit.transfer import _shared_hop, _small, _write_behind
from conduit.transfer._progress import (
    ProgressCallbackError,
    TransferProgress,
    callback_errors_as_they_are,
)
from conftest import (
    ALICE_PASSWORD,
    ClientFactory,
    ServerFactory,
    asyncio_until,
    client_descriptor,
    open_descriptors,
    opened_since,
    server_descriptor,
    wait_until,
)
from test_accounts import accounts_behind_a_looped_link
from test_resource_limits import _cycle_collector_off, _what_cycles_hold
from transfer_helpers import make_file, register_replacing, storage_server

MiB = 1024 * 1024


class _Hanging:
    """An RPC handler that blocks until cancelled, counting calls begun and ended."""

    def __init__(self) -> None:
        self.started = 0
        self.ended = 0

    async def hang(self) -> None:
        self.started += 1
        try:
            await trio.sleep_forever()
        finally:
            self.ended += 1


async def test_a_blocked_handler_cancelled_leaves_no_cycle(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """``_call_workers._resume`` (its ``del reply``): a handler that blocked
    goes on in a task that passes Trio's answers to it; the answer to a wait
    cancelled is an Error outcome holding the Cancelled, which the handler
    raises through ``_resume``'s frame. Kept there, it closes a cycle holding
    the handler's frames. Cancelled here by the client giving up on the call
    (its CANCEL), three times, and by the connection ending under it."""
    handler = _Hanging()
    server = await server_factory(register=lambda server: server.register_rpc(handler.hang))
    client = await client_factory(server)
    (peer,) = server.clients.values()
    with _cycle_collector_off() as garbage:
        for count in (1, 2, 3):
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.call, "hang")
                    await wait_until(lambda: handler.started == count)  # noqa: B023
                    nursery.cancel_scope.cancel()
                await wait_until(lambda: handler.ended == count)  # noqa: B023
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_call_cut_short, client)
            await wait_until(lambda: handler.started == 4)
            await client.disconnect()
        # Its end waits for every task of it: the handlers' are over.
        with trio.fail_after(10):
            await peer.connection.closed.wait()
        assert handler.ended == 4
        del peer
    assert _what_cycles_hold(garbage) == []


async def _call_cut_short(client: Client) -> None:
    with pytest.raises(ConnectionClosed, match="disconnected"):
        await client.call("hang")


async def test_a_connection_its_trio_run_ends_under_leaves_no_cycle(
    server_factory: ServerFactory,
) -> None:
    """``Connection.run`` (it keeps whether cancellation alone ended it, not
    the exception that did): cancelled from outside while the connection is
    open, as when the Trio run of a client program ends with its client
    connected (its connection is a system task of that run; ``asyncio.run()``
    ending does the same), it tells a cancellation from a failure (only the
    first says GOODBYE). The exception kept in its frame for that, which that
    exception's traceback holds, made a cycle holding the whole connection.

    Each client program runs in a Trio run of its own, in a worker thread.
    A run that has ended leaves its own objects in cycles, its tasks and what
    they hold (its client's connection too): no frame or exception, which are
    what must not be there.
    """
    server = await server_factory(register=lambda server: server.register_rpc(_echo))
    with _cycle_collector_off() as garbage:
        for _ in range(2):
            with trio.fail_after(20):
                await trio.to_thread.run_sync(_run_a_client_left_connected, server.port)
        await wait_until(lambda: not server.clients)
    assert [held for held in _what_cycles_hold(garbage) if held != "Connection"] == []


async def _echo(value: int) -> int:
    return value


#: What ``os.open`` says of a NUL in a path: "embedded null byte" up to Python
#: 3.12, "embedded null character in path" from 3.13.
NUL_IN_PATH = "embedded null (byte|character)"


def _run_a_client_left_connected(port: int) -> None:
    """A client program whose Trio run ends with its client connected."""

    async def main() -> None:
        client = Client(client_descriptor(port, reconnect_enabled=False))
        with trio.fail_after(10):
            await client.connect()
            assert await client.call("_echo", value=7) == 7

    trio.run(main)


async def test_handshakes_the_server_refuses_leave_no_cycle(
    server_factory: ServerFactory, accounts: Accounts, caplog: pytest.LogCaptureFixture
) -> None:
    """``_handshake_io.server_handshake`` (it raises the error detached): a
    handshake the server refuses (a wrong password, an unknown user, a client
    of the other mode) keeps its error on the handshake machine, which the
    frame raising it holds: raised as it is, a cycle through the
    gatekeeper's frames. (A shared-password server confirms first, and a
    client with the wrong password leaves without the server refusing it:
    this takes a server with accounts.)"""
    # The server's warning about each refusal has the error among its
    # arguments: a record kept (pytest keeps every test's) would keep the
    # cycle reachable, hidden from this test.
    caplog.set_level(logging.ERROR, logger="conduit.server")
    server = await server_factory(password=None, accounts=accounts)
    attempts = [
        {"username": "alice", "password": "not alice's password"},
        {"username": "mallory", "password": ALICE_PASSWORD},
        {"password": ALICE_PASSWORD},  # no username: the shared-password mode
    ]
    before = open_descriptors()
    with _cycle_collector_off() as garbage:
        for fields in attempts:
            refused = Client(client_descriptor(server.port, **fields))
            with pytest.raises(AuthenticationError), trio.fail_after(10):
                await refused.connect()
            del refused
        # The client reads the refusal before the server's task is over; the
        # socket's close is its last step.
        await wait_until(lambda: not opened_since(before))
    assert _what_cycles_hold(garbage) == []


async def test_a_probe_failing_in_the_shared_hop_leaves_no_cycle(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """``transfer._shared_hop.SharedHop.run`` (it takes the error off the job
    and deletes it once raised): once a run has seen slow looks, the sending
    side looks at each file in the shared worker-thread hop, whose job keeps
    the call's error; raised from there, its traceback holds the worker's and
    the callers' frames, which hold the job: a cycle. A path with a NUL byte
    makes the look raise (``ValueError``)."""
    _, server = await storage_server(server_factory, tmp_path / "storage")
    client = await client_factory(server)
    transfer = FileTransferHandler()
    # This run's file system has been slow three times (a per-run state).
    _small._looks().slow = _small.INLINE_SLOW_LOOKS
    assert not _small.looks_inline()
    with _cycle_collector_off() as garbage:
        for _ in range(3):
            with pytest.raises(ValueError, match=NUL_IN_PATH), trio.fail_after(10):
                await transfer.send_to_server(client, str(tmp_path / "bad\0name"))
    assert _what_cycles_hold(garbage) == []


async def test_a_shared_hop_call_whose_caller_left_leaves_no_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``transfer._shared_hop.SharedHop``: a queued call taken into a hop, its
    caller cancelled while it runs, fails; nobody takes the error off its
    job, whose traceback holds the worker's frame, which held the job (the
    hop now drops an abandoned job's error)."""
    # Queued calls wait for the hop under way, however slow this machine is
    # (past STALLED_AFTER they would go alone instead).
    monkeypatch.setattr(_shared_hop, "STALLED_AFTER", 30.0)
    started = {0: threading.Event(), 1: threading.Event()}
    release = {0: threading.Event(), 1: threading.Event()}

    def work(arg: int) -> int:
        if arg in started:
            started[arg].set()
            release[arg].wait(10)
        if arg == 2:
            raise ValueError("its caller is gone")
        return arg

    hop: _shared_hop.SharedHop[int, int] = _shared_hop.SharedHop(work)
    leaving = trio.CancelScope()

    async def leaves() -> None:
        with leaving:
            await hop.run(2)

    try:
        with _cycle_collector_off() as garbage:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hop.run, 0)  # the first hop, under way at once
                    await trio.to_thread.run_sync(started[0].wait, 10)
                    nursery.start_soon(hop.run, 1)  # queued: leads the next hop ...
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(leaves)  # ... which takes this one too
                    await trio.testing.wait_all_tasks_blocked()
                    release[0].set()
                    await trio.to_thread.run_sync(started[1].wait, 10)
                    leaving.cancel()  # gone while its call waits in the hop
                    await trio.testing.wait_all_tasks_blocked()
                    release[1].set()
    finally:
        for event in release.values():
            event.set()
        hop.close()
    assert leaving.cancelled_caught
    assert _what_cycles_hold(garbage) == []


@contextlib.contextmanager
def _files_capped_at(size: int) -> Iterator[None]:
    """For the block, a write past ``size`` bytes of a file fails in this
    process (``RLIMIT_FSIZE``: the kernel's ``EFBIG``), with ``SIGXFSZ``,
    which would kill the process, ignored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


async def test_a_download_whose_write_fails_leaves_no_cycle(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """``transfer._write_behind`` (the failure kept detached, ``del result``
    in the thread's loop): a download's writes past its first batches go
    through a writer thread, which keeps a write's failure for the transfer
    to raise. Kept with its traceback, which holds the thread loop's frame,
    and so the writer, it closes a cycle; left in that frame once the loop is
    over, it closes another.

    The write fails for real: past the file's last byte but one, the
    kernel refuses it (``EFBIG``). The failing batch is the last one, and so
    the last the thread's loop handles (a batch after it would replace the
    failure in that frame)."""
    storage = tmp_path / "storage"
    size = 24 * MiB
    await make_file(storage / "big.bin", size)
    _, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    (peer,) = server.clients.values()
    with _cycle_collector_off() as garbage:
        with _files_capped_at(size - 1), trio.fail_after(30):
            result = await FileTransferHandler().receive_from_server(
                client, "big.bin", tmp_path / "down"
            )
        assert result["success"] is False and result["code"] == "too_large", result
        del result
        # The writer thread's loop is over once its token is back.
        limiter = _write_behind._threads()
        await wait_until(lambda: limiter.borrowed_tokens == 0)
        await client.disconnect()
        with trio.fail_after(10):
            await peer.connection.closed.wait()
        del peer
    assert _what_cycles_hold(garbage) == []


async def test_a_server_run_cancelled_with_clients_connected_leaves_no_cycle() -> None:
    """``Server._run_claimed`` (it deletes the error it raises from its frame):
    a server's run that ends through its nurseries' group (cancelled here, as
    Ctrl-C or a program's end does, with two clients connected) raises the
    group's one error alone, kept in a local of the frame its traceback then
    holds: a cycle holding every connection the run ended."""
    server = Server(server_descriptor())
    clients: list[Client] = []
    with _cycle_collector_off() as garbage:
        async with trio.open_nursery() as nursery:
            serving = trio.CancelScope()
            stopped = trio.Event()

            async def serve() -> None:
                with serving:
                    await server.run()
                stopped.set()

            nursery.start_soon(serve)
            with trio.fail_after(10):
                port = await server.wait_listening()
                for _ in range(2):
                    client = Client(client_descriptor(port, reconnect_enabled=False))
                    await client.connect()
                    clients.append(client)
                await wait_until(lambda: len(server.clients) == 2)
                serving.cancel()
                await stopped.wait()
                for client in clients:
                    await client.disconnect()
        del client
        clients.clear()
    assert _what_cycles_hold(garbage) == []


async def test_a_client_dropped_after_its_connection_leaves_no_cycle(
    server_factory: ServerFactory,
) -> None:
    """``Client.rpc`` (it reaches its client's connection through a weak
    reference): the proxy kept the client's bound method, the client kept the
    proxy, and a client dropped after use kept its last connection until the
    cycle collector ran. Freed by reference counting, the connection goes
    with it (a weak reference says so)."""
    server = await server_factory(register=lambda server: server.register_rpc(_echo))
    with _cycle_collector_off() as garbage:
        client = Client(client_descriptor(server.port, reconnect_enabled=False))
        with trio.fail_after(10):
            await client.connect()
            assert await client.rpc.invoke("_echo", value=3) == 3
            await client.disconnect()
        gone = weakref.ref(client)
        del client
        assert gone() is None
    assert _what_cycles_hold(garbage) == []


async def test_a_server_run_ended_by_one_error_leaves_no_cycle() -> None:
    """``Server._run_claimed``, its other way out: a run that ends with one
    error taken out of its nurseries' group (a handler's ``sys.exit(3)``,
    raised from ``run()`` as ``SystemExit(3)``, with two clients connected)
    raises that error from the frame that kept it in a local."""
    server = Server(server_descriptor())

    @server.rpc
    async def shutdown() -> None:
        sys.exit(3)

    ended: list[str] = []
    with _cycle_collector_off() as garbage:
        async with trio.open_nursery() as nursery:

            async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    await server.run(task_status=task_status)
                except SystemExit as exc:
                    ended.append(repr(exc))

            with trio.fail_after(10):
                port = await nursery.start(run)
                clients = [Client(client_descriptor(port, reconnect_enabled=False)) for _ in "ab"]
                for client in clients:
                    await client.connect()
                with pytest.raises(ConnectionClosed):
                    await clients[0].call("shutdown")
                await wait_until(lambda: bool(ended))
                for client in clients:
                    await client.disconnect()
        del client, clients
    assert ended == ["SystemExit(3)"]
    assert _what_cycles_hold(garbage) == []


async def test_a_server_that_failed_to_start_leaves_no_cycle() -> None:
    """``Server._run_claimed``'s record of a start that failed (the port in
    use), kept for a ``wait_listening()`` that nobody makes: the server is
    then dropped, and reference counting alone must free it."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server = Server(server_descriptor(port=blocker.getsockname()[1]))
        gone = weakref.ref(server)
        with _cycle_collector_off() as garbage:
            with trio.fail_after(10), pytest.raises(OSError):
                await server.run()
            del server
            assert gone() is None  # with the collector off: by reference counting
    assert _what_cycles_hold(garbage) == []


@pytest.mark.parametrize("ending", ["attempts-failed", "password-refused"])
async def test_a_client_whose_reconnect_gave_up_leaves_no_cycle(
    ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``Client._reconnect_attempts``: the last failed attempt's error (kept
    for the "gave up" message) and the server's refusal of the password
    (``reconnect_refused``), both raised through the frame that kept them.
    The client, disconnected and dropped, must go by reference counting."""
    # The client's log lines carry the error as an argument, and pytest's
    # capture keeps every record (with the error's traceback, its frames, the
    # client) until the test ends: what a handler keeps is not the library's.
    caplog.set_level(logging.CRITICAL, logger="conduit.client")
    server = Server(server_descriptor())
    with _cycle_collector_off() as garbage:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            client = Client(
                client_descriptor(
                    port,
                    # Refused, it gives up at once; else after its attempts
                    # (enough for the other server to be listening first).
                    reconnect_attempts=2 if ending == "attempts-failed" else 100,
                    reconnect_delay=0.05,
                    reconnect_delay_max=0.1,
                    heartbeat_interval=0,
                )
            )
            await client.connect()
            await server.close()  # going away: the client tries to come back
        async with trio.open_nursery() as nursery:
            other: Server | None = None
            if ending == "password-refused":
                # Back on the same port with another password.
                other = Server(server_descriptor(port=port, password="not the one it knows"))
                await nursery.start(other.run)

            def gave_up(of: Client = client) -> bool:
                return of._gave_up is not None

            await wait_until(gave_up, timeout=20)
            del gave_up  # it holds the client
            refused = client.reconnect_refused
            assert (refused is not None) == (ending == "password-refused"), client._gave_up
            del refused
            await client.disconnect()
            gone = weakref.ref(client)
            del client
            assert gone() is None  # with the collector off: by reference counting
            if other is not None:
                await other.close()
    assert _what_cycles_hold(garbage) == []


def test_accounts_whose_file_cannot_be_stated_leave_no_cycle(tmp_path: Path) -> None:
    """``Accounts._current_signature`` (it keeps the ``stat`` error detached in
    ``stat_error``): kept as it is, its traceback holds that method's frame,
    which holds the accounts. A symlink loop stands in for a directory that
    refuses access (as root no permission bit stops ``stat``)."""
    accounts, _ = accounts_behind_a_looped_link(tmp_path)
    with _cycle_collector_off() as garbage:
        assert not accounts.changed()
        assert isinstance(accounts.stat_error, OSError)
        gone = weakref.ref(accounts)
        del accounts
        assert gone() is None  # with the collector off: by reference counting
    assert _what_cycles_hold(garbage) == []


def test_an_asyncio_handler_failing_leaves_no_cycle() -> None:
    """``_callbacks._await_on_host`` (``del error, future`` once raised):
    under ``asyncio.run`` an ``async def`` handler runs as an asyncio task on
    the host loop; its error, taken from the task, is raised again in the
    Trio task that awaits it, from a frame that kept both the error and the
    task: a cycle through the call's frames."""

    async def refuse() -> None:
        await asyncio.sleep(0)  # an asyncio handler, on the asyncio loop
        raise RPCError("refused", "forbidden")

    cycles = _cycles_of_asyncio_calls_refused(refuse)
    assert cycles == [], "\n".join(cycles)


def _cycles_of_asyncio_calls_refused(refuse: Callable[[], Any]) -> list[str]:
    """Under ``asyncio.run``, a server with ``refuse`` as its RPC handler and a
    client calling it three times, each call refused ``forbidden``, with the
    cycle collector off until the server has seen the client go: the cyclic
    garbage left."""
    cycles: list[str] = []

    async def main() -> None:
        server = Server(ServerDescriptor(host="127.0.0.1", port=0, password="pw"))
        server.register_rpc(refuse)
        task = asyncio.create_task(server.run())
        await asyncio.wait_for(server.wait_listening(), 5)
        with _cycle_collector_off() as garbage:
            client = Client(ClientDescriptor(server_port=server.port, password="pw"))
            async with client:
                (peer,) = await asyncio_until(lambda: list(server.clients.values()))
                for _ in range(3):
                    # Not under asyncio.wait_for: Python 3.11's makes a cycle
                    # of its own with the error it passes on.
                    with pytest.raises(RPCError, match="forbidden"):
                        await client.call("refuse")
            # Its end waits for every task of it: the handlers' are over.
            await asyncio_until(peer.connection.closed.is_set)
            del client, peer
        cycles.extend(_what_cycles_hold(garbage))
        await server.close()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    return cycles


@pytest.fixture(scope="module")
def bus_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Valkey (or Redis) on 127.0.0.1 for this module's cluster bus
    (see ``cluster_engines``; the cluster tests' ``engines`` start SeaweedFS too)."""
    with valkey(tmp_path_factory.mktemp("valkey")) as engine:
        yield engine.url


async def _two_buses(bus_url: str, nursery: trio.Nursery) -> tuple[ClusterBus, ClusterBus]:
    """Nodes "a" (asking) and "b" (answering) on the real bus, in a namespace of their own."""
    namespace = f"conduit-test-{secrets.token_hex(6)}"
    buses = [ClusterBus(bus_url, name, namespace=namespace) for name in "ab"]
    for bus in buses:
        await nursery.start(bus.run)
    return buses[0], buses[1]


@pytest.mark.parametrize(
    ("failure", "answered"),
    [
        (lambda: ValueError("a bug"), "ValueError: a bug"),
        (lambda: RPCError("not yours", "denied"), "not yours"),
    ],
    ids=["a bug", "a refusal"],
)
async def test_a_cluster_request_that_failed_leaves_no_cycle(
    bus_url: str,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    failure: Callable[[], Exception],
    answered: str,
) -> None:
    """Both ends of a cluster request whose handler fails.

    ``cluster.bus.ClusterBus.request`` (it raises the reply's error
    detached): the error a node answers a request with is kept on the
    request's pending record, which the frame raising it holds: raised as it
    is, a cycle through the requester's frames.

    ``ClusterBus._serve_request`` (it keeps a copy of a handler's
    ``RPCError``): the serving node keeps the error to answer with in a local
    of the frame the error's traceback holds: the handler's own ``RPCError``
    kept as it is (an ordinary refusal of a real node's handler) closed a
    cycle through the handler's frames there. A bug (a ``ValueError``) is
    answered with a new ``RPCError``; its log line would keep the bug's
    traceback: off.
    """
    caplog.set_level(logging.CRITICAL, logger="conduit.cluster.bus")
    asking, answering = await _two_buses(bus_url, nursery)

    @answering.on_request
    async def fail(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        raise failure()  # a new one each time: raising one again would free the last cycle

    with _cycle_collector_off() as garbage:
        for _ in range(3):
            with pytest.raises(RPCError, match=answered), trio.fail_after(10):
                await asking.request("b", "fail", {})
        # The serving task is over once it has answered: its frame is gone.
        await wait_until(lambda: not answering._serving)
    assert _what_cycles_hold(garbage) == []


async def test_a_cluster_request_its_progress_callback_ended_leaves_no_cycle(
    bus_url: str, nursery: trio.Nursery
) -> None:
    """``cluster.bus.ClusterBus.request`` (``del failed`` once raised): what
    ``on_progress`` raises ends the wait; it is kept in a local, to be raised
    outside the watch's nursery, and raised from that frame."""
    asking, answering = await _two_buses(bus_url, nursery)

    @answering.on_request
    async def slow(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        await answering.report_progress({"done": 1})
        await trio.sleep(30)  # cancelled: the requester stops waiting
        return {}

    async def stops(data: Any) -> None:
        raise ValueError("the caller stops here")

    with _cycle_collector_off() as garbage:
        for _ in range(3):
            with pytest.raises(ValueError, match="stops here"), trio.fail_after(10):
                await asking.request("b", "slow", {}, on_progress=stops)
        await wait_until(lambda: not answering._serving)
    assert _what_cycles_hold(garbage) == []


async def test_a_cluster_request_the_bus_lost_leaves_no_cycle(
    bus_url: str, nursery: trio.Nursery
) -> None:
    """``cluster.bus.ClusterBus.request`` (the watch's verdict taken from its
    list, raised, then deleted): a node that stays registered but never
    reads its inbox (a request lost on the bus) ends the wait with
    ``RequestLost`` a TTL later, raised from the frame whose list kept it."""
    ttl = 0.6
    namespace = f"conduit-test-{secrets.token_hex(6)}"
    asking = ClusterBus(bus_url, "a", namespace=namespace, ttl=ttl)
    await nursery.start(asking.run)
    registry = redis.Redis.from_url(bus_url)

    async def deaf_node() -> None:
        # Registered as the bus registers a node; its inbox never read.
        while True:
            await trio.to_thread.run_sync(
                lambda: registry.set(f"{namespace}:node:deaf", "the test", px=int(ttl * 1000))
            )
            await trio.sleep(ttl / 3)

    try:
        async with trio.open_nursery() as registering:
            registering.start_soon(deaf_node)
            await wait_until(lambda: registry.exists(f"{namespace}:node:deaf") == 1)
            with _cycle_collector_off() as garbage:
                for _ in range(3):
                    with pytest.raises(RequestLost), trio.fail_after(10 * ttl):
                        await asking.request("deaf", "push", {}, timeout=math.inf)
            registering.cancel_scope.cancel()
    finally:
        registry.close()
    assert _what_cycles_hold(garbage) == []


@pytest.fixture(scope="module")
def s3_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Engine]:
    """A real SeaweedFS S3 gateway on 127.0.0.1 for this module (see ``cluster_engines``)."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as engine:
        yield engine


@pytest.fixture
def staging(s3_engine: S3Engine) -> Iterator[S3Store]:
    """A cluster staging area of the test's own, on the real S3 store."""
    client = make_s3_client(
        endpoint_url=s3_engine.endpoint_url,
        aws_access_key_id=s3_engine.access_key,
        aws_secret_access_key=s3_engine.secret_key,
        region_name=s3_engine.region,
    )
    store = S3Store(f"s3://{s3_engine.bucket}/t-{secrets.token_hex(6)}", client=client)
    yield store
    store.close()
    client.close()


@pytest.mark.parametrize(
    ("refusal", "answered"),
    [
        (lambda: RPCError("the client refused the push", "denied"), "denied"),
        (lambda: ConnectionClosed("the client left"), "connection_closed"),
    ],
    ids=["refused", "client-left"],
)
async def test_a_staged_push_its_pusher_fails_leaves_no_cycle(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    staging: S3Store,
    refusal: Callable[[], Exception],
    answered: str,
) -> None:
    """``cluster._push.deliver_staged`` (``del failure`` once raised): the
    client's node fetches a push another node staged and hands it to its
    pusher; what the pusher raised is kept (to be raised outside the relay's
    nursery, not in its group) and raised from that frame: kept there, a
    cycle through the frames of the push, its server's among them.

    Driven from ``deliver_staged`` itself, as the node's request handler
    calls it, with a staged file on a real S3 store and a pusher that
    refuses, or finds the client gone (``ConnectionClosed``, answered as a
    new ``RPCError`` with the code ``connection_closed``: the kept error was
    not deleted on that way out) (``serve_pushes`` takes any; the transfer
    handler's returns its failures rather than raising them).
    """
    server = await server_factory()
    client = await client_factory(server)

    async def refusing(*_: object) -> dict[str, Any]:
        raise refusal()

    async def report(_: object) -> None:
        await trio.lowlevel.checkpoint()

    with _cycle_collector_off() as garbage:
        for index in range(3):
            data = f"staged file {index}".encode()
            digest = hashlib.sha256(data).hexdigest()
            token = secrets.token_hex(8)
            staged = await staging.open_staging(token)
            await staged.append(data)
            await staged.publish(expected_sha256=digest)
            request = PushRequest(client.id or "", token, "pushed.bin", len(data), digest, 0)
            with pytest.raises(RPCError) as raised, trio.fail_after(20):
                await deliver_staged(staging, request, server, refusing, report)
            assert raised.value.code == answered
            del raised
    assert _what_cycles_hold(garbage) == []


# ------------------------------------------------------- the sender asking for its verdict


@pytest.mark.parametrize("then", ["not_found", "answered"])
async def test_a_verdict_refused_overloaded_leaves_no_cycle(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path, then: str
) -> None:
    """``transfer._sender._ask_verdict``: the receiver refuses the sender's
    ``file_upload_finish`` ``overloaded`` (its call limit was full), so the
    sender keeps that refusal in a local (``refused``) and asks again. Asked
    again, the verdict is gone (``not_found``): the refusal is raised
    (``raise refused from None``) and the upload fails ``overloaded``; or it
    is answered, and the upload succeeds. Both over real sockets, with the
    server's finish replaced by one that refuses the first ask of each upload."""
    transfer = FileTransferHandler(storage_dir=tmp_path / "server")
    asked = 0

    async def finish_refused_first(
        caller: Peer, stream_id: int | None = None, abandon: bool = False, key: str = ""
    ) -> dict[str, Any]:
        nonlocal asked
        if not abandon:
            asked += 1
            if asked % 2 == 1:
                raise RPCError("too many calls at once (limit 128)", "overloaded")
            if then == "not_found":
                raise RPCError("no verdict waits for that stream", "not_found")
        answer: dict[str, Any] = await transfer._receiver.rpc_finish(
            caller, stream_id=stream_id, abandon=abandon, key=key
        )
        return answer

    server = await server_factory(
        register=register_replacing(transfer, "file_upload_finish", finish_refused_first)
    )
    client = await client_factory(server)
    (peer,) = server.clients.values()
    source = tmp_path / "big.bin"
    await make_file(source, MiB)
    sender = FileTransferHandler(storage_dir=tmp_path / "client")
    with _cycle_collector_off() as garbage:
        for index in range(3):
            with trio.fail_after(20):
                result = await sender.send_to_server(client, source, remote_name=f"up{index}.bin")
            if then == "not_found":
                assert result["success"] is False and result["code"] == "overloaded", result
            else:
                assert result["success"] is True, result
            del result
        assert asked == 6
        await client.disconnect()
        with trio.fail_after(10):
            await peer.connection.closed.wait()
        del peer
    held = _what_cycles_hold(garbage)
    assert held == [], "\n".join(held)


# ------------------------------------------------------------- a progress callback raising


@pytest.mark.parametrize("what", ["file", "directory", "files"])
async def test_a_progress_callback_that_raises_leaves_no_cycle(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path, what: str
) -> None:
    """``transfer._progress.callback_errors_as_they_are``: what on_progress
    raised comes through the transfer as a ``ProgressCallbackError`` (alone
    for one file, in a group for several at once: a directory,
    ``send_files_to_server``), and the public method raises the callback's
    own error from the frame that took it out (``exc``/``matched``/``first``)."""
    transfer = FileTransferHandler(storage_dir=tmp_path / "server")
    server = await server_factory(register=transfer.register_server_handlers)
    client = await client_factory(server)
    (peer,) = server.clients.values()
    outbox = tmp_path / "outbox"
    for index in range(4):
        await make_file(outbox / f"f{index}.bin", MiB if index % 2 else 1000)
    sender = FileTransferHandler(storage_dir=tmp_path / "client")

    def fails(progress: TransferProgress) -> None:
        # A new error each time, of the callback's own frame only.
        raise RuntimeError("a bug in the progress bar")

    async def send() -> Any:
        if what == "file":
            return await sender.send_to_server(client, outbox / "f1.bin", on_progress=fails)
        if what == "directory":
            return await sender.send_to_server(client, outbox, on_progress=fails)
        files = sorted(outbox.iterdir())
        return await sender.send_files_to_server(client, files, on_progress=fails)

    with _cycle_collector_off() as garbage:
        for _ in range(3):
            with pytest.raises(RuntimeError, match="progress bar"), trio.fail_after(20):
                await send()
        await client.disconnect()
        with trio.fail_after(10):
            await peer.connection.closed.wait()
        del peer
    held = _what_cycles_hold(garbage)
    assert held == [], "\n".join(held)


async def test_a_progress_error_beside_another_failure_stays_a_group_with_no_cycle() -> None:
    """``transfer._progress.callback_errors_as_they_are``'s bare ``raise``: a
    group holding a ``ProgressCallbackError`` beside a failure of another kind
    (several files at once, one whose callback raised and one whose transfer
    failed) is raised as it is, and the parts split out of it (``matched``,
    ``rest``), which carry its traceback, do not stay in the frame that
    traceback holds. Raised here by the wrapped function itself: no public
    transfer fails that way on demand."""
    callback_error = RuntimeError("a bug in the progress bar")
    other = OSError(5, "the disk failed")

    @callback_errors_as_they_are
    async def several_files() -> None:
        await trio.lowlevel.checkpoint()
        raise ExceptionGroup("two files", [ProgressCallbackError(callback_error), other])

    with _cycle_collector_off() as garbage:
        for _ in range(3):
            with pytest.raises(ExceptionGroup) as raised:
                await several_files()
            carried, failed = raised.value.exceptions
            assert isinstance(carried, ProgressCallbackError)
            assert carried.error is callback_error and failed is other
            del raised, carried, failed
    held = _what_cycles_hold(garbage)
    assert held == [], "\n".join(held)


# ---------------------------------------------------------- a client handler ending the process


@pytest.mark.parametrize("next_step", ["call", "connect", "disconnect"])
async def test_a_client_handler_calling_sys_exit_leaves_no_cycle(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
    next_step: str,
) -> None:
    """``Client._raise_fatal``: a SystemExit a client's handler raised ends
    the connection; the client keeps it (``_fatal``) and raises it in the
    application's task from its next call, connect() or disconnect()."""
    # The client's error line has the SystemExit among its arguments: a
    # record kept would keep the cycle reachable, hidden from this test.
    caplog.set_level(logging.CRITICAL, logger="conduit.client")

    async def echo(value: int) -> int:
        await trio.lowlevel.checkpoint()
        return value

    server = await server_factory(register=lambda s: s.register_rpc(echo))

    def quit_now(data: Any) -> None:
        sys.exit(3)

    with _cycle_collector_off() as garbage:
        for _ in range(3):
            client = await client_factory(
                server, register=lambda c: c.on("quit")(quit_now), reconnect_enabled=False
            )
            with trio.fail_after(10):
                await server.broadcast("quit", None)
                await wait_until(lambda: not client.connected)  # noqa: B023
                with pytest.raises(SystemExit):
                    await _next_step(client, next_step)
                await client.disconnect()
        await wait_until(lambda: not server.clients)
    held = _what_cycles_hold(garbage)
    assert held == [], "\n".join(held)


async def _next_step(client: Client, step: str) -> None:
    if step == "call":
        await client.call("echo", value=1)
    elif step == "connect":
        await client.connect()
    else:
        await client.disconnect()


# ----------------------------------------------------------------------- the asyncio shim


def _asyncio_cycles(body: Any) -> list[str]:
    """Run ``body(server)`` under asyncio.run with a server that has a
    ``hang`` and an ``echo`` RPC, with the cycle collector off; the cyclic
    garbage it left."""
    cycles: list[str] = []

    async def main() -> None:
        server = Server(ServerDescriptor(host="127.0.0.1", port=0, password="pw"))

        @server.rpc
        async def hang() -> None:
            await asyncio.sleep(3600)

        @server.rpc
        async def echo(value: int) -> int:
            return value

        task = asyncio.create_task(server.run())
        await asyncio.wait_for(server.wait_listening(), 5)
        with _cycle_collector_off() as garbage:
            await body(server)
            await asyncio_until(lambda: not server.clients)
        cycles.extend(_what_cycles_hold(garbage))
        await server.close()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    return cycles


def test_an_asyncio_fast_path_call_timing_out_leaves_no_cycle() -> None:
    """``_host_rpc._HostCalls.call``: a call awaited from asyncio on the loop
    hosting its connection awaits an asyncio future; its failure (here the
    call timer's ``RPCTimeoutError``) is set on that future and raised from
    it in the frame that holds the future."""

    async def body(server: Server) -> None:
        client = Client(ClientDescriptor(server_port=server.port, password="pw"))
        async with client:
            for _ in range(3):
                with pytest.raises(RPCTimeoutError):
                    await client.call("hang", timeout=0.05)
        del client

    cycles = _asyncio_cycles(body)
    assert cycles == [], "\n".join(cycles)


def test_a_bridged_call_failing_under_asyncio_leaves_no_cycle() -> None:
    """``_bridge.bridged`` (its wrapper): a bridged method awaited from
    asyncio runs in the guest run; its failure is set on the call's future,
    which the wrapper's ``call`` holds, and raised from there. Here a
    ``send_to_server`` whose path has a NUL byte (``ValueError``)."""

    async def body(server: Server) -> None:
        client = Client(ClientDescriptor(server_port=server.port, password="pw"))
        async with client:
            for _ in range(3):
                with pytest.raises(ValueError, match=NUL_IN_PATH):
                    await FileTransferHandler().send_to_server(client, "bad\0name")
        del client

    cycles = _asyncio_cycles(body)
    assert cycles == [], "\n".join(cycles)


def test_run_in_trio_failing_leaves_no_cycle() -> None:
    """``_asyncio.run_in_trio``: the same, through the public function."""

    async def fails() -> None:
        await trio.lowlevel.checkpoint()
        raise ValueError("the Trio side failed")

    async def body(server: Server) -> None:
        for _ in range(3):
            with pytest.raises(ValueError, match="Trio side failed"):
                await run_in_trio(fails)

    cycles = _asyncio_cycles(body)
    assert cycles == [], "\n".join(cycles)


# ------------------------------------------------- a handler returning a failed asyncio future


def test_a_handler_returning_a_failed_asyncio_future_leaves_no_cycle() -> None:
    """``_callbacks._await_on_host`` (and ``invoke``) when the awaitable a
    handler returns is itself an asyncio future: its error, taken from the
    future, is raised in the Trio task that awaits it, from frames that hold
    the future (``awaitable``, ``result``)."""

    def refuse() -> asyncio.Future[None]:
        # A plain function: called in the Trio task, its future awaited on
        # the host loop.
        future = asyncio.get_running_loop().create_future()
        future.get_loop().call_soon(future.set_exception, RPCError("refused", "forbidden"))
        return future

    cycles = _cycles_of_asyncio_calls_refused(refuse)
    assert cycles == [], "\n".join(cycles)


def test_run_in_trio_cancelled_failing_as_it_unwinds_leaves_no_cycle() -> None:
    """``_asyncio.run_in_trio`` / ``_worker``, their cancelled path: the
    caller is cancelled and the Trio side raises while unwinding; that error
    is kept on the call (``late_error``) and chained as the cause of the
    caller's ``CancelledError``."""
    started: list[int] = []

    async def fails_unwinding() -> None:
        started.append(1)
        try:
            await trio.sleep_forever()
        finally:
            raise ValueError("failed as it unwound")

    async def body(server: Server) -> None:
        for count in (1, 2, 3):
            task = asyncio.create_task(run_in_trio(fails_unwinding))
            await asyncio_until(lambda: len(started) == count)  # noqa: B023
            task.cancel()
            # Not asyncio.wait_for: Python 3.11's makes a cycle of its own
            # with the error it passes on.
            done, _ = await asyncio.wait([task], timeout=5)
            assert task in done and task.cancelled()
            del done, task

    cycles = _asyncio_cycles(body)
    assert cycles == [], "\n".join(cycles)


def test_a_bridge_worker_keeps_nothing_of_its_last_call() -> None:
    """``_asyncio._worker`` (``del handed``): a worker of the guest run that
    was handed a call keeps nothing of it once it is over. It kept the call
    while it waited for the next one (the few ticks it stays runnable for a
    caller that calls again at once, see ``_spin``), and so its arguments:
    those of a bridged method hold the client, and the client its
    connection. The caller, resumed, finds its argument held by nobody else;
    several calls one after the other, as all but the first go to a worker
    that was handed them."""

    class Argument:
        """An object only the call holds."""

    async def takes(argument: Argument) -> None:
        await trio.lowlevel.checkpoint()

    held: list[int] = []

    async def main() -> None:
        for number in range(6):
            argument = Argument()
            alive = weakref.ref(argument)
            await run_in_trio(takes, argument)
            del argument
            if alive() is not None:
                held.append(number)

    asyncio.run(main())
    assert held == []


def test_an_asyncio_client_connection_ended_is_freed_with_no_cycle() -> None:
    """Not an error site: found while fixing ``_asyncio._worker`` above. An
    asyncio client's connection has a host reader (``_host_reader``), whose
    callback is the connection's bound ``_drain_on_host``: a cycle
    (connection -> reader -> method -> connection) that ``Connection._unlink``
    did not break. It was hidden: an idle bridge worker kept the last call
    handed to it (``handed``), ``disconnect()``'s, and with it the client and
    its connection (kept alive, not garbage). Ended, the connection must go
    by reference counting."""
    connections: list[weakref.ref[Any]] = []

    async def body(server: Server) -> None:
        client = Client(ClientDescriptor(server_port=server.port, password="pw"))
        async with client:
            connections.append(weakref.ref(client.server.connection))
            assert await client.call("echo", value=5) == 5
        del client

    cycles = _asyncio_cycles(body)
    assert (cycles, [ref() for ref in connections]) == ([], [None])
