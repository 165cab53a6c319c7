"""Where the handshake's work runs, and what a refusal costs the server.

- the server's handshake steps run on the event loop within a bounded share of
  its time (:class:`conduit._gatekeeper.LoopShare`), in worker threads beyond
  it, and both paths authenticate the same; a handshake alone in the gate is
  not rationed (:attr:`conduit._gatekeeper.Gatekeeper.alone`);
- the client stretches its password in a worker thread only when its
  :class:`ProverCache` misses (:meth:`ClientHandshake.will_stretch`);
- the accounts file is re-read only when its ``stat`` changed
  (:meth:`Accounts.changed`);
- a locked-out address is refused inside the accept loop
  (:class:`conduit._gatekeeper.ScreenedListener`), with the same AUTH_FAILED
  the per-connection task sends, and other addresses pass through.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import weakref
from typing import Any

import pytest
import trio

from conduit import Accounts, AuthenticationError, Client, ServerDescriptor
from conduit._connection import Connection
from conduit._gatekeeper import Gatekeeper, LoopShare, ScreenedListener
from conduit.accounts import FAKE_CACHE
from conduit.protocol import (
    ClientHandshake,
    Frame,
    FrameKind,
    FrameReader,
    HandshakeState,
    ServerHandshake,
    decode_body,
)
from conduit.protocol.handshake import ProverCache
from conduit.protocol.messages import AuthFailed, ClientHello, ServerHello
from conftest import (
    ALICE_PASSWORD,
    FAST_STRETCH,
    LOOPBACK,
    PASSWORD,
    ServerFactory,
    client_descriptor,
    competing_handshake,
    open_descriptors,
    served,
    wait_until,
)

# --------------------------------------------------------------------------- the loop share


def _frame_of(data: bytes) -> Frame:
    """The one whole frame at the start of ``data`` (a handshake step's output)."""
    reader = FrameReader()
    reader.feed(data)
    frame = reader.next_frame()
    assert frame is not None
    return frame


def test_loop_share_is_a_token_bucket_of_loop_seconds() -> None:
    share = LoopShare(share=0.25, burst=0.01)
    assert share.allows(100.0)
    share.spend(0.02)  # one expensive step overdraws the bucket
    assert not share.allows(100.0)
    assert not share.allows(100.03)  # refilled by 0.0075 of the 0.01 owed: still no
    assert share.allows(100.05)
    # Never more than the burst, however long it stayed idle.
    share.allows(1000.0)
    assert share.tokens == pytest.approx(0.01)
    # A clock that goes backwards adds nothing.
    share.spend(0.01)
    assert not share.allows(999.0)


def _thread_steps(monkeypatch: pytest.MonkeyPatch, gate: Gatekeeper) -> list[object]:
    """The handshake steps ``gate`` sends to worker threads from now on (a list
    that fills as they go)."""
    sent: list[object] = []
    run_sync = trio.to_thread.run_sync

    async def recording(step: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("limiter") is gate.limiter:
            sent.append(step)
        return await run_sync(step, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", recording)
    return sent


async def test_competing_steps_run_inline_within_the_share_and_in_threads_beyond(
    server_factory: ServerFactory, accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (A long auth_timeout: the competing socket stays in the gate throughout.)
    server = await server_factory(password=None, accounts=accounts, auth_timeout=60.0)
    gate = server._gate
    in_threads = _thread_steps(monkeypatch, gate)
    client = Client(client_descriptor(server.port, username="alice", password=ALICE_PASSWORD))
    async with competing_handshake(server):
        with trio.fail_after(10):
            await client.connect()
        await client.disconnect()
        # Inline: the steps were measured against the share.
        assert in_threads == []
        assert gate.loop_share.tokens < gate.loop_share.burst
        # An exhausted share sends every step to a worker thread: same outcome.
        gate.loop_share = LoopShare(share=0.0, burst=0.0)
        with trio.fail_after(10):
            await client.connect()
        assert client.connected
        await client.disconnect()
        assert len(in_threads) >= 2  # the hello's step and the confirmation's
        assert gate.loop_share.tokens == 0.0  # nothing ran inline
        wrong = Client(client_descriptor(server.port, username="alice", password="wrong"))
        with pytest.raises(AuthenticationError), trio.fail_after(10):
            await wrong.connect()


@pytest.mark.parametrize("mode", ["shared", "accounts"])
async def test_a_handshake_alone_in_the_gate_runs_inline_and_is_not_charged(
    server_factory: ServerFactory,
    accounts: Accounts,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One client reconnecting back to back spends more than the share of the
    # loop's wall time on its steps; with no other handshake to compete with,
    # none of them goes to a thread, however spent the share, and none is
    # charged to it (a long run of them would otherwise leave the next flood's
    # rationing in debt).
    if mode == "accounts":
        server = await server_factory(password=None, accounts=accounts)
        descriptor = client_descriptor(server.port, username="alice", password=ALICE_PASSWORD)
    else:
        server = await server_factory()
        descriptor = client_descriptor(server.port)
    gate = server._gate
    gate.loop_share = LoopShare(share=0.0, burst=0.0)
    in_threads = _thread_steps(monkeypatch, gate)
    confirmed_first: list[bool] = []
    confirm_first = ServerHandshake.confirm_first

    def recording(machine: ServerHandshake) -> bytes:
        confirmed_first.append(True)
        return confirm_first(machine)

    monkeypatch.setattr(ServerHandshake, "confirm_first", recording)
    client = Client(descriptor)
    for _ in range(3):
        with trio.fail_after(10):
            await client.connect()
            await served(server, client)
        await client.disconnect()
    assert in_threads == []
    assert gate.loop_share.tokens == 0.0
    # Inline, hence in the order that saves the client a round trip (its
    # first login in accounts mode has no early share to confirm with).
    assert len(confirmed_first) == (3 if mode == "shared" else 2)


@pytest.mark.parametrize("gate", ["alone", "competing", "share exhausted"])
@pytest.mark.parametrize("mode", ["shared", "accounts"])
async def test_the_server_multiplies_between_the_hellos(
    server_factory: ServerFactory,
    accounts: Accounts,
    mode: str,
    gate: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Accounts mode (a first login): the SERVER_HELLO goes out first, then its
    # multiplication, while the client works on its confirmation: the
    # confirmation's step finds it done. Shared password: the server confirms
    # first, so the multiplication is part of that step, before the reply
    # goes out; the confirmation's step finds it done. So it goes alone in
    # the gate, and with another handshake there within the loop share. Beyond
    # the share (both modes) the usual order, and the multiplication is left
    # to the confirmation's step, which runs in a worker thread anyway (no
    # hand-off of its own).
    seen: list[tuple[HandshakeState, bool]] = []
    precompute = ServerHandshake.precompute

    def recording(machine: ServerHandshake) -> None:
        seen.append((machine.state, machine.precompute_due))
        precompute(machine)

    monkeypatch.setattr(ServerHandshake, "precompute", recording)
    if mode == "accounts":
        server = await server_factory(password=None, accounts=accounts, auth_timeout=60.0)
        descriptor = client_descriptor(server.port, username="alice", password=ALICE_PASSWORD)
    else:
        server = await server_factory(auth_timeout=60.0)
        descriptor = client_descriptor(server.port)
    client = Client(descriptor)
    async with contextlib.AsyncExitStack() as competing:
        if gate != "alone":
            await competing.enter_async_context(competing_handshake(server))
        if gate == "share exhausted":
            server._gate.loop_share = LoopShare(share=0.0, burst=0.0)
        with trio.fail_after(10):
            await client.connect()
            await served(server, client)  # its confirmation's step has run
        if gate == "competing":
            # Within the share: the steps were charged to it.
            assert server._gate.loop_share.tokens < server._gate.loop_share.burst
    assert client.connected
    await client.disconnect()
    waiting = HandshakeState.WAIT_CLIENT_CONFIRM
    if gate == "share exhausted":
        assert seen == [(waiting, True)]  # from the confirmation's step only
    else:
        assert seen == [(waiting, True), (waiting, False)]


# --------------------------------------------------------------------------- the client's stretch


def test_the_client_stretches_only_on_a_cache_miss(accounts: Accounts) -> None:
    cache = ProverCache()

    def server_hello(client: ClientHandshake) -> tuple[ServerHandshake, bytes]:
        server = ServerHandshake(
            None, name="s", max_frame_size=1 << 20, receive_window=1 << 22, accounts=accounts.lookup
        )
        return server, server.receive(_frame_of(client.start()))

    first = ClientHandshake(
        ALICE_PASSWORD,
        name="c",
        max_frame_size=1 << 20,
        receive_window=1 << 22,
        username="alice",
        cache=cache,
    )
    _, reply = server_hello(first)
    frame = _frame_of(reply)
    assert first.will_stretch(frame)
    first.receive(frame)  # stretches, and fills the cache
    assert not first.will_stretch(frame)  # not in WAIT_SERVER_HELLO any more

    again = ClientHandshake(
        ALICE_PASSWORD,
        name="c",
        max_frame_size=1 << 20,
        receive_window=1 << 22,
        username="alice",
        cache=cache,
    )
    _, reply = server_hello(again)
    assert not again.will_stretch(_frame_of(reply))

    # Another password is another cache entry: a stretch again.
    other = ClientHandshake(
        "another password",
        name="c",
        max_frame_size=1 << 20,
        receive_window=1 << 22,
        username="alice",
        cache=cache,
    )
    _, reply = server_hello(other)
    assert other.will_stretch(_frame_of(reply))

    # Shared-password mode stretches once per process, before the handshake.
    shared = ClientHandshake(PASSWORD, name="c", max_frame_size=1 << 20, receive_window=1 << 22)
    assert not shared.will_stretch(_frame_of(reply))


# --------------------------------------------------------------------------- the accounts file


def test_accounts_changed_is_one_stat_until_reloaded(accounts: Accounts) -> None:
    assert not accounts.changed()
    Accounts(accounts.path, stretch=FAST_STRETCH).add("carol", "carol's passphrase")
    assert accounts.changed()
    assert "carol" not in accounts  # nothing read yet
    assert accounts.reload_if_changed()
    assert not accounts.changed()
    assert "carol" in accounts


# --------------------------------------------------------------------------- refused at accept


async def test_locked_out_addresses_are_refused_inside_the_accept_loop() -> None:
    descriptor = ServerDescriptor(
        host=LOOPBACK, port=0, password=PASSWORD, auth_failure_limit=1, auth_lockout=60
    )
    gate = Gatekeeper(descriptor, logging.getLogger("conduit.server"))
    gate.throttle.record_failure("127.0.0.5", trio.current_time())
    (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listener.socket.getsockname()[1]
    screened = gate.screen(listener)
    assert isinstance(screened, ScreenedListener)
    accepted: list[trio.SocketStream] = []

    async def accept_one() -> None:
        accepted.append(await screened.accept())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_one)
            locked = await trio.open_tcp_stream(LOOPBACK, port, local_address="127.0.0.5")
            reader = FrameReader()
            while (frame := reader.next_frame()) is None:
                data = await locked.receive_some(4096)
                assert data, "closed without a refusal"
                reader.feed(data)
            assert frame.kind is FrameKind.AUTH_FAILED
            refusal = decode_body(frame, AuthFailed)
            assert refusal.code == "throttled"
            assert 50 < refusal.retry_after <= 60
            assert await locked.receive_some(4096) == b""  # and closed
            await locked.aclose()
            assert accepted == []  # the server never saw it
            honest = await trio.open_tcp_stream(LOOPBACK, port, local_address="127.0.0.6")
    (stream,) = accepted
    assert stream.socket.getpeername()[0] == "127.0.0.6"
    await stream.aclose()
    await honest.aclose()
    await screened.aclose()


def test_only_socket_listeners_are_screened() -> None:
    gate = Gatekeeper(ServerDescriptor(password=PASSWORD), logging.getLogger("conduit.server"))

    class Other(trio.abc.Listener[trio.abc.Stream]):
        async def accept(self) -> trio.abc.Stream:
            raise NotImplementedError

        async def aclose(self) -> None:
            pass

    other = Other()
    assert gate.screen(other) is other


def test_fake_records_are_kept_for_known_and_unknown_names_alike(accounts: Accounts) -> None:
    first = accounts.lookup("mallory")
    assert accounts.lookup("mallory") is first  # kept: a dictionary hit the second time
    assert accounts.lookup("alice") is accounts.get("alice")
    # A known name's fake was built and kept too: the same work as an unknown one.
    assert len(accounts._fakes) == 2
    assert Accounts(accounts.path, stretch=FAST_STRETCH).lookup("mallory").salt == first.salt
    for index in range(FAKE_CACHE + 10):
        accounts.lookup(f"user{index}")
    assert len(accounts._fakes) == FAKE_CACHE
    # Forgotten, rebuilt the same (deterministic).
    assert accounts.lookup("mallory").verifier == first.verifier


# --------------------------------------------------------------------------- what a session costs


async def _echo(value: int) -> int:
    return value


async def test_a_session_ended_by_the_client_is_not_cancelled_and_leaves_no_cycles(
    server_factory: ServerFactory,
) -> None:
    """The common end (the client's GOODBYE) needs no cancellation, starts no
    writer task, and the session's objects go with their last reference: no
    reference cycle is left for the cycle collector (disabled here)."""
    server = await server_factory()
    server.register_rpc(_echo, "echo")
    client = Client(client_descriptor(server.port))
    gc.disable()
    try:
        with trio.fail_after(10):
            await client.connect()
            assert (await client.rpc.call("echo", value=7))["data"] == 7
        assert client.id is not None
        connection = server.clients[client.id].connection
        nursery = connection._nursery
        assert nursery is not None
        scope = nursery.cancel_scope
        gone = weakref.ref(connection)
        del connection, nursery
        await client.disconnect()
        await wait_until(lambda: not server._open_sockets)
        assert not scope.cancel_called
        assert gone() is None
    finally:
        gc.enable()


def writer_started(connection: Connection) -> bool:
    """Whether the connection's writer task has started (read afresh at each call)."""
    return connection._writer_started


async def test_the_writer_task_starts_with_the_first_frame_that_must_wait(
    server_factory: ServerFactory,
) -> None:
    """Results and calls go out directly while the writer is idle: a session
    that only answers calls never starts it; a ping (the heartbeat's) does."""
    server = await server_factory()
    server.register_rpc(_echo, "echo")
    client = Client(client_descriptor(server.port))
    with trio.fail_after(10):
        await client.connect()
        assert (await client.rpc.call("echo", value=1))["data"] == 1
        assert client.id is not None
        connection = server.clients[client.id].connection
        assert not writer_started(connection)
        assert connection.beat(trio.current_time())  # queues a PING
        assert writer_started(connection)
        assert (await client.rpc.call("echo", value=2))["data"] == 2
        await client.disconnect()


async def test_the_accept_loop_hands_over_the_peer_address() -> None:
    gate = Gatekeeper(ServerDescriptor(password=PASSWORD), logging.getLogger("conduit.server"))
    (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listener.socket.getsockname()[1]
    listening_socket = f"socket:[{os.fstat(listener.socket.fileno()).st_ino}]"
    screened = gate.screen(listener)
    assert isinstance(screened, ScreenedListener)
    with trio.fail_after(10):
        client = await trio.open_tcp_stream(LOOPBACK, port, local_address="127.0.0.7")
        stream, address = await screened.accept_with_address()
    assert address == ("127.0.0.7", client.socket.getsockname()[1])
    assert stream.socket.getpeername()[:2] == address
    await stream.aclose()
    await client.aclose()
    await screened.aclose()
    # Neither the listener's descriptor nor the gate's duplicate is left open.
    assert listening_socket not in open_descriptors()


def peeked(server: ServerHandshake) -> tuple[Frame, ClientHello] | None:
    """The server's kept decoding of a CLIENT_HELLO (read afresh at each call)."""
    return server._peeked


def test_the_server_decodes_the_client_hello_once() -> None:
    client = ClientHandshake(PASSWORD, name="c", max_frame_size=1 << 20, receive_window=1 << 20)
    reader = FrameReader()
    reader.feed(client.start())
    hello = reader.next_frame()
    assert hello is not None
    server = ServerHandshake(PASSWORD, name="s", max_frame_size=1 << 20, receive_window=1 << 20)
    assert server.hello_username(hello) == ""
    assert server._peeked is not None and server._peeked[0] is hello
    reply = server.receive(hello)  # the kept decoding
    assert peeked(server) is None
    reader = FrameReader()
    reader.feed(reply)
    frame = reader.next_frame()
    assert frame is not None and frame.kind is FrameKind.SERVER_HELLO
    # Another frame object is decoded as usual.
    other = ServerHandshake(PASSWORD, name="s", max_frame_size=1 << 20, receive_window=1 << 20)
    other.hello_username(hello)
    second = ClientHandshake(PASSWORD, name="c", max_frame_size=1 << 20, receive_window=1 << 20)
    reader = FrameReader()
    reader.feed(second.start())
    again = reader.next_frame()
    assert again is not None
    assert other.receive(again)


def test_the_accounts_client_decodes_the_server_hello_once(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """will_stretch() decodes the SERVER_HELLO; receive() of the same frame
    uses that decoding (the connect's critical path), and still completes."""
    import conduit.protocol.handshake as handshake_module

    client = ClientHandshake(
        ALICE_PASSWORD, name="c", max_frame_size=1 << 20, receive_window=1 << 22, username="alice"
    )
    server = ServerHandshake(
        None, name="s", max_frame_size=1 << 20, receive_window=1 << 22, accounts=accounts.lookup
    )
    hello = _frame_of(client.start())
    frame = _frame_of(server.receive(hello))
    decoded: list[object] = []
    real = decode_body

    def counting(frame: Any, kind: Any) -> Any:
        decoded.append(kind)
        return real(frame, kind)

    monkeypatch.setattr(handshake_module, "decode_body", counting)
    assert client.will_stretch(frame)
    confirm = client.receive(frame)
    assert decoded == [ServerHello]
    confirm_frame = _frame_of(confirm)
    assert confirm_frame.kind is FrameKind.CLIENT_CONFIRM
    assert server.receive(confirm_frame)  # the SERVER_CONFIRM: the keys agree
    assert server.keys is not None
