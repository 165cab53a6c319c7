"""disconnect() racing the background reconnect's handshake.

A lost connection is re-established by the client's supervisor task;
disconnect() awaits things (the lost session's close, a connect() on its
way) during which that reconnect's handshake may finish. Once disconnect()
has begun, no reconnect may install a new session: disconnect() must return
with the client not connected, the server serving nothing, ``wait_closed()``
returning, no ``on_reconnect`` hook run and no resume token kept.

Each test holds the reconnect's handshake at a known point (after the
server welcomed it, before the client installs the session) by wrapping the
``client_handshake`` the client awaits, and lets disconnect() begin there:
no timing loop. Real loopback sockets, and a :class:`CuttingProxy` to lose
the first connection.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from conduit import Client, Peer
from conduit._handshake_io import client_handshake
from conduit.protocol.handshake import shared_secret
from conftest import PASSWORD, ServerFactory, client_descriptor, served, wait_until
from cutting_proxy import CuttingProxy


@pytest.fixture(autouse=True)
def _stretched() -> None:
    # The shared password's Argon2id stretch, paid once here, outside the
    # tests' deadlines.
    shared_secret(PASSWORD)


def connected(client: Client) -> bool:
    """``client.connected`` read afresh (a type checker must not assume it unchanged)."""
    return client.connected


class HeldHandshake:
    """Wraps the client's ``client_handshake``: the next handshake completes
    with the server, then waits for :attr:`release` before it returns.

    ``shielded``: the wait ignores cancellation, as a handshake whose last
    step finishes without a checkpoint would (a disconnect()'s cancellation
    then cannot stop it: only the client's own check can).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, shielded: bool) -> None:
        self._shielded = shielded
        #: The server has welcomed the reconnect; it waits for ``release``.
        self.held = trio.Event()
        self.release = trio.Event()
        #: The wrapped handshake has returned or raised.
        self.returned = trio.Event()
        # Where the client looks it up, at each connect.
        monkeypatch.setattr("conduit.client.client_handshake", self)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            result = await client_handshake(*args, **kwargs)
            self.held.set()
            with trio.CancelScope(shield=self._shielded):
                await self.release.wait()
            return result
        finally:
            self.returned.set()


def reconnecting_client(proxy_port: int, reconnected: list[str]) -> Client:
    """A client through the proxy that reconnects at once; ``reconnected``
    collects its ``on_reconnect`` calls."""
    client = Client(client_descriptor(proxy_port, reconnect_delay=0.0, reconnect_delay_max=0.0))
    client.on_reconnect(lambda: reconnected.append("reconnected"))
    return client


async def assert_nothing_installed(client: Client, reconnected: list[str]) -> None:
    """disconnect() has returned: no session now or once everything settles, no
    on_reconnect hook, no resume token for a later connect() to use."""
    assert not connected(client)
    await trio.testing.wait_all_tasks_blocked()
    assert not connected(client)
    assert not reconnected
    assert client._resume_token == b""


async def test_disconnect_stops_a_reconnect_whose_handshake_finishes_during_it(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reviewer's race: disconnect() awaits the lost session's close, and
    # the reconnect's handshake finishes during that await.
    server = await server_factory()
    reconnected: list[str] = []
    with CuttingProxy(server.port) as proxy:
        client = reconnecting_client(proxy.port, reconnected)
        try:
            with trio.fail_after(10):
                await client.connect()
                await served(server, client)
                lost = client.server.connection
                hold = HeldHandshake(monkeypatch, shielded=False)
                real_close = lost.close

                async def close_while_the_reconnect_finishes(
                    reason: str = "closed by this side", grace: float = 2.0
                ) -> None:
                    # The reconnect may go on now; disconnect() is inside its
                    # first await. Every other task runs before it goes on.
                    hold.release.set()
                    await hold.returned.wait()
                    await trio.testing.wait_all_tasks_blocked()
                    await real_close(reason, grace)

                monkeypatch.setattr(lost, "close", close_while_the_reconnect_finishes)
                proxy.legs[-1].close()
                await hold.held.wait()
                assert proxy.accepted == 2

                await client.disconnect()

                await assert_nothing_installed(client, reconnected)
                await wait_until(lambda: not server.clients)
            with trio.fail_after(2):
                await client.wait_closed()
        finally:
            with trio.move_on_after(5):
                await client.disconnect()


async def test_a_reconnect_handshake_ending_after_disconnect_began_installs_nothing(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The handshake cannot be cancelled at its hold: it returns after
    # disconnect() began, and the client must not install what it brought.
    gone: list[Peer] = []
    server = await server_factory(register=lambda s: s.on_client_disconnect(gone.append))
    reconnected: list[str] = []
    with CuttingProxy(server.port) as proxy:
        client = reconnecting_client(proxy.port, reconnected)
        try:
            with trio.fail_after(10):
                await client.connect()
                await served(server, client)
                hold = HeldHandshake(monkeypatch, shielded=True)
                proxy.legs[-1].close()
                await hold.held.wait()
                # The server serves the reconnect already (and may still
                # report the lost session's end).
                await wait_until(lambda: len(server.clients) == 1 and len(gone) == 1)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.disconnect)
                    # disconnect() has begun (and waits, or is done): only
                    # now does the reconnect's handshake return.
                    await trio.testing.wait_all_tasks_blocked()
                    hold.release.set()

                await assert_nothing_installed(client, reconnected)
                # The reconnect's session was said goodbye to, not dropped.
                await wait_until(lambda: not server.clients and len(gone) == 2)
                assert gone[1].connection.closed_on_purpose
            with trio.fail_after(2):
                await client.wait_closed()
        finally:
            with trio.move_on_after(5):
                await client.disconnect()


async def test_disconnect_from_an_on_reconnecting_hook_finishes(
    server_factory: ServerFactory,
) -> None:
    """The hook runs in the reconnect's own task: disconnect() there must neither
    cancel itself nor wait for the reconnect, which stops once the hook returns."""
    server = await server_factory()
    with CuttingProxy(server.port) as proxy:
        client = Client(client_descriptor(proxy.port, reconnect_delay=0.05, reconnect_attempts=0))
        outcome: list[str] = []

        @client.on_reconnecting
        async def give_up(attempt: int, delay: float) -> None:
            try:
                await client.disconnect()
            except BaseException as exc:
                outcome.append(type(exc).__name__)
                raise
            outcome.append("returned")

        with trio.fail_after(10):
            await client.connect()
            await served(server, client)
            proxy.legs[0].close()  # the hook runs before the first new attempt
            await wait_until(lambda: bool(outcome))
            await client.wait_closed()
    assert outcome == ["returned"]
    assert not client.connected
    assert client._resume_token == b""  # a later connect() starts a new session
