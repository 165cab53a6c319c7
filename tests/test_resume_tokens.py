"""A resume token is valid only once its WELCOME is out, and always expires.

A token in the server's table with no connection to start its clock
(:meth:`conduit._resume.ResumeTokens.start_expiry`) would stay valid for ever,
until the table's FIFO eviction: these tests check that a connection that
fails between the password check and its session leaves no such token.
Over in-memory streams (``memory_server_factory``): the socket is not the point.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import trio

from conduit import Accounts, Server
from conduit.protocol import ClientHandshake, FrameReader
from conftest import (
    ALICE_PASSWORD,
    HANDSHAKE_LIMITS,
    ClientFactory,
    ServerFactory,
    memory_listener_of,
    wait_until,
)


def _settled(server: Server, accepted: int) -> bool:
    """Whether ``server`` has accepted ``accepted`` connections and is done with them all."""
    return memory_listener_of(server).accepted == accepted and server._open_sockets == 0


async def _confirm_and_vanish(server: Server) -> None:
    """Log in as alice by hand, first login (no early share: the server's usual
    order), and close the connection right after the CLIENT_CONFIRM, so that
    the server verifies it but cannot send the WELCOME."""
    stream = await memory_listener_of(server).connect()
    handshake = ClientHandshake(ALICE_PASSWORD, name="gone", username="alice", **HANDSHAKE_LIMITS)
    await stream.send_all(handshake.start())
    reader = FrameReader()
    with trio.fail_after(10):
        while (frame := reader.next_frame()) is None:
            data = await stream.receive_some(4096)
            assert data, "the server closed the connection"
            reader.feed(data)
    confirm = await trio.to_thread.run_sync(handshake.receive, frame)
    assert confirm, "no CLIENT_CONFIRM: the server did not take the usual order"
    await stream.send_all(confirm)
    await stream.aclose()  # gone before the WELCOME, like a reset


async def test_a_client_gone_before_its_welcome_leaves_no_token(
    memory_server_factory: ServerFactory,
    memory_client_factory: ClientFactory,
    accounts: Accounts,
) -> None:
    server = await memory_server_factory(password=None, accounts=accounts)
    for round_ in range(1, 4):
        await _confirm_and_vanish(server)
        await wait_until(functools.partial(_settled, server, round_))
    assert server.clients == {}
    assert len(server._resume_tokens) == 0
    # The control: the same login, staying, does get its token.
    client = await memory_client_factory(server, username="alice", password=ALICE_PASSWORD)
    assert client.id is not None
    assert server._resume_tokens.current(client.id) is not None
    assert len(server._resume_tokens) == 1


async def test_a_session_that_cannot_open_still_lets_its_token_expire(
    memory_server_factory: ServerFactory,
    memory_client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Welcomed, then the session fails to open (a bug of ours, say): the token
    the client got must start to expire like that of any connection that ended."""
    server = await memory_server_factory()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no session today")

    monkeypatch.setattr(server, "_open_session", broken)
    client = await memory_client_factory(server, connect=False, reconnect_enabled=False)
    await client.connect()  # the WELCOME came: the client holds a token
    await wait_until(lambda: _settled(server, 1))
    entries = list(server._resume_tokens._entries.values())
    assert len(entries) == 1 and entries[0].client_id == client.id
    assert entries[0].expires != math.inf


async def test_a_client_that_says_goodbye_leaves_no_token_and_a_lost_one_does(
    memory_server_factory: ServerFactory, memory_client_factory: ClientFactory
) -> None:
    """``disconnect()`` says GOODBYE for good and forgets the client's token, so
    the server forgets it too, at once (until 2026-12-08 it kept it for
    ``RESUME_TTL``, an hour, up to ``MAX_TOKENS`` of them: about 400 bytes each
    for every client that had come and gone); a connection lost without a
    goodbye keeps its token, to resume with, and its clock starts."""
    server = await memory_server_factory()
    leaving = await memory_client_factory(server, reconnect_enabled=False)
    lost = await memory_client_factory(server, reconnect_enabled=False)
    leaving_id, lost_id = leaving.id, lost.id
    assert len(server._resume_tokens) == 2
    with trio.fail_after(10):
        await leaving.disconnect()
        await wait_until(lambda: leaving_id not in server.clients)
        assert lost._peer is not None
        lost._peer.connection.abort("the link is lost")  # no goodbye
        await wait_until(lambda: lost_id not in server.clients)
    entries = list(server._resume_tokens._entries.values())
    assert [entry.client_id for entry in entries] == [lost_id]
    assert entries[0].expires != math.inf


async def test_a_client_that_closes_when_idle_comes_back_under_a_new_id(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """Its ``idle_timeout`` is a close of its own, as ``disconnect()``: no
    reconnect, its token forgotten on both sides (until 2026-12-08 the server
    kept it for an hour, and the next ``connect()`` got the id back). Over
    TCP: a client given its stream presents no token."""
    server = await server_factory()
    client = await client_factory(server, connect=False, idle_timeout=0.2)
    with trio.fail_after(10):
        await client.connect()
        first_id = client.id
        # (The client forgets its token as its connection's run ends, which
        # may come a moment after it stops counting as connected.)
        await wait_until(
            lambda: (
                not client.connected
                and first_id not in server.clients
                and client._resume_token == b""
            )  # forgotten here too: none presented
        )
        assert len(server._resume_tokens) == 0
        await client.connect()
    assert client.id != first_id
    await client.disconnect()
