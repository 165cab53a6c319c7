"""RPC misused the ways users misuse it: each mistake gets a clear error on
the side that made it, and never ends the connection (a RESULT the peer
cannot decode, or a timer crashed by a NaN deadline, used to end it, with
every other call on it).

Over real loopback sockets; the asyncio cases run the client under
``asyncio.run``, through the shim's fast path.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import pytest
import trio

from conduit import Client, RPCError, Server
from conduit._call_workers import MAX_ERROR_TEXT
from conftest import ClientFactory, ServerFactory, client_descriptor, server_descriptor


class Unprintable(Exception):
    """An exception whose message cannot be formatted."""

    def __str__(self) -> str:
        raise RuntimeError("str exploded")


def _register(server: Server) -> None:
    @server.rpc
    async def echo(value: Any) -> Any:
        return value

    @server.rpc
    async def unprintable() -> None:
        raise Unprintable

    @server.rpc
    async def odd_rpc_error() -> None:
        raise RPCError(object(), code=404)  # type: ignore[arg-type]

    @server.rpc
    async def tuple_keys() -> Any:
        return {(0, 0): "origin"}

    @server.rpc
    async def nested() -> Any:
        deep: list[Any] = []
        for _ in range(2_000):
            deep = [deep]
        return deep

    @server.rpc
    async def long_error() -> None:
        raise ValueError("x" * 1_100_000)

    @server.rpc
    async def blocking_unprintable() -> None:
        await trio.sleep(0.01)  # the follower's path: the handler blocked first
        raise Unprintable


def _calls_pending(client: Client) -> int:
    peer = client._peer
    assert peer is not None
    return len(peer.connection._pending._calls)


@pytest.mark.parametrize("how", ["invoke", "call", "client.call"])
async def test_a_timeout_that_is_no_number_is_refused_before_the_call_goes(
    tcp_server_factory: ServerFactory, tcp_client_factory: ClientFactory, how: str
) -> None:
    server = await tcp_server_factory(register=_register)
    client = await tcp_client_factory(server)
    send = {
        "invoke": client.rpc.invoke,
        "call": client.rpc.call,
        "client.call": client.call,
    }[how]
    with pytest.raises(ValueError, match="NaN"):
        await send("echo", value=1, timeout=math.nan)
    wrongs: list[Any] = ["1", True, [1.0]]
    for wrong in wrongs:
        with pytest.raises(TypeError, match="timeout must be a number"):
            await send("echo", value=1, timeout=wrong)
    assert _calls_pending(client) == 0  # none was registered and left behind
    assert await client.call("echo", value=2, timeout=5) == 2  # the connection lives on
    assert await client.call("echo", value=3, timeout=math.inf) == 3


async def test_a_timeout_that_is_no_number_is_refused_from_the_server_side_too(
    tcp_server_factory: ServerFactory, tcp_client_factory: ClientFactory
) -> None:
    server = await tcp_server_factory()
    client = await tcp_client_factory(server, register=_register)
    assert client.id is not None
    peer = server.clients[client.id]
    with pytest.raises(ValueError, match="NaN"):
        await peer.call("echo", value=1, timeout=math.nan)
    assert await peer.call("echo", value=2) == 2


def test_a_nan_timeout_under_asyncio_is_refused_and_the_connection_lives_on() -> None:
    async def main() -> list[Any]:
        server = Server(server_descriptor())
        _register(server)
        serving = asyncio.create_task(server.run())
        port = await asyncio.wait_for(server.wait_listening(), 10)
        seen: list[Any] = []
        try:
            async with Client(client_descriptor(port)) as client:
                # The shim's fast path (client.call, rpc.call, rpc.invoke on the loop).
                for send in (client.call, client.rpc.call, client.rpc.invoke):
                    with pytest.raises(ValueError, match="NaN"):
                        await asyncio.wait_for(send("echo", value=1, timeout=math.nan), 10)
                    seen.append(_calls_pending(client))
                seen.append(await asyncio.wait_for(client.call("echo", value=4), 10))
        finally:
            await server.close()
            await asyncio.wait_for(serving, 10)
        return seen

    assert asyncio.run(main()) == [0, 0, 0, 4]


async def test_errors_that_cannot_go_on_the_wire_as_they_are_still_reach_the_caller(
    tcp_server_factory: ServerFactory,
    tcp_client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await tcp_server_factory(register=_register)
    client = await tcp_client_factory(server)
    caplog.set_level(logging.ERROR, logger="conduit.connection")
    # Each used to end the connection: its RESULT could not be encoded, or
    # not decoded by the caller.
    for method in ("unprintable", "blocking_unprintable"):
        failed = await client.rpc.call(method)
        assert failed["code"] == "handler_error", failed
        assert failed["error"] == "Unprintable: <Unprintable that cannot be shown>"
    failed = await client.rpc.call("odd_rpc_error")
    assert failed["code"] == "404" and failed["error"].startswith("<object object at"), failed
    # A handler that returned a value the wire cannot carry is told apart
    # from one that failed: bad_result, not handler_error.
    for method in ("tuple_keys", "nested"):
        failed = await client.rpc.call(method)
        assert failed["code"] == "bad_result", failed
        assert failed["error"].startswith("the handler's result cannot be sent"), failed
    unsendable = [r for r in caplog.records if "cannot be sent" in r.getMessage()]
    assert len(unsendable) == 2
    # A megabyte of message is cut, not lost behind "the result cannot be sent".
    failed = await client.rpc.call("long_error")
    assert failed["code"] == "handler_error", failed
    assert failed["error"].startswith("ValueError: xxx") and "characters cut" in failed["error"]
    assert len(failed["error"]) < MAX_ERROR_TEXT + 100
    assert await client.call("echo", value="still here") == "still here"
    assert client.connected


async def test_registration_mistakes_are_named(
    tcp_server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await tcp_server_factory()
    with pytest.raises(TypeError, match=r"write @rpc\(name=\.\.\.\)"):
        server.rpc("add")  # type: ignore[call-overload]

    class Nameless:
        async def __call__(self) -> None:
            pass

    with pytest.raises(TypeError, match="has no __name__"):
        server.register_rpc(Nameless())

    @server.rpc
    async def twice() -> int:
        return 1

    caplog.set_level(logging.WARNING, logger="conduit.rpc")

    @server.rpc(name="twice")
    async def again() -> int:
        return 2

    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["RPC method 'twice' registered again: the new handler replaces the old"]
