"""The handshake budget's bare-Trio floor does the exchange it claims to.

``benchmarks.handshake_budget --reference`` is only a floor if it does the
same work as conduit's handshake: the same messages (sizes from the sans-IO
machines) and key schedules that agree on both sides. Its client and server
assert on any disagreement; here they run against each other over loopback.
"""

from __future__ import annotations

import pytest
import trio
from benchmarks import handshake_budget as budget


@pytest.mark.parametrize("mode", ["shared", "accounts"])
async def test_the_floor_completes_its_exchange_over_loopback(mode: str) -> None:
    secrets = budget._Secrets(mode)
    served: list[int] = []
    all_served = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        await budget._reference_connection(secrets, stream)
        served.append(1)
        if len(served) == 3:
            all_served.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host=budget.HOST)
            port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, handler, listeners)
            await budget._reference_connects(port, secrets, 3)
            await all_served.wait()
            nursery.cancel_scope.cancel()
    assert len(served) == 3  # each to the GOODBYE, opened with the session key
    assert min(secrets.sizes) > 32  # each message carries at least a point or a MAC


async def test_the_floor_fails_on_a_wrong_confirmation() -> None:
    """A floor whose two sides disagree stops (it would not measure the work)."""
    client, server = budget._Secrets("shared"), budget._Secrets("shared")
    # Another w in the server's transcript: its keys, hence both MACs, differ.
    server.balanced = type(server.balanced)(bytes(32), server.balanced.w_m, server.balanced.w_n)
    failures: list[BaseException] = []

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await budget._reference_connection(server, stream)
        except AssertionError as exc:
            failures.append(exc)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host=budget.HOST)
            port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, handler, listeners)
            with pytest.raises((AssertionError, EOFError, trio.BrokenResourceError)):
                await budget._reference_connects(port, client, 1)
            nursery.cancel_scope.cancel()
    assert failures
