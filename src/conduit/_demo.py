"""``conduit demo``: a server and a client on loopback, every feature exercised once.

It is the README's first command, so it must succeed on a fresh machine, print
what it does, and exit non-zero if anything did not match.
"""

from __future__ import annotations

import secrets
import statistics
import time

import attrs
import trio

from . import AuthenticationError, Client, ClientDescriptor, Peer, Server, ServerDescriptor


@attrs.frozen
class Point:
    """A structured RPC argument, to show cattrs at work."""

    x: float
    y: float


def _say(step: str, detail: str) -> None:
    print(f"  {step:<28} {detail}", flush=True)


async def _demo(calls: int) -> bool:
    password = secrets.token_urlsafe(12)
    server = Server(
        ServerDescriptor(host="127.0.0.1", port=0, password=password, name="demo-server")
    )
    inbox: list[object] = []
    noted = trio.Event()

    @server.rpc
    async def add(a: int, b: int) -> int:
        return a + b

    @server.rpc
    async def norm(point: Point) -> float:
        return float((point.x**2 + point.y**2) ** 0.5)

    @server.rpc
    async def greet_back(caller: Peer) -> str:
        # A handler may call back into the client that called it.
        name = await caller.call("whoami")
        return f"hello {name}, you are client {caller.id}"

    @server.on("note")
    async def note(client: Peer, data: object) -> None:
        inbox.append(data)
        noted.set()

    ok = True
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        print(f"conduit demo: server listening on 127.0.0.1:{port}")
        client = Client(
            ClientDescriptor(
                server_host="127.0.0.1", server_port=port, password=password, name="demo"
            )
        )

        @client.rpc
        async def whoami() -> str:
            return "demo-client"

        started = time.perf_counter()
        await client.connect()
        _say("connect + SPAKE2 handshake", f"{(time.perf_counter() - started) * 1000:.1f} ms")
        ok &= client.id in server.clients

        result = await client.rpc.call("add", a=2, b=40)
        _say("rpc.call('add', a=2, b=40)", repr(result))
        ok &= result == {"success": True, "data": 42}

        length = await client.call("norm", point=Point(3, 4))
        _say("call('norm', Point(3, 4))", repr(length))
        ok &= length == 5.0

        greeting = await client.call("greet_back")
        _say("server calls client back", repr(greeting))
        ok &= greeting == f"hello demo-client, you are client {client.id}"

        missing = await client.rpc.call("no_such_method")
        _say("unknown method", repr(missing))
        ok &= missing.get("code") == "not_found"

        await client.send("note", {"text": "one-way message"})
        with trio.fail_after(5):
            await noted.wait()
        _say("one-way message", repr(inbox[0]))

        intruder = Client(
            ClientDescriptor(server_host="127.0.0.1", server_port=port, password="guess")
        )
        try:
            await intruder.connect()
            ok = False
            _say("wrong password", "was ACCEPTED (bug)")
        except AuthenticationError as exc:
            _say("wrong password", f"refused: {exc}")

        timings = []
        for i in range(calls):
            t0 = time.perf_counter()
            await client.call("add", a=i, b=1)
            timings.append(time.perf_counter() - t0)
        timings.sort()
        p50 = statistics.median(timings) * 1e6
        p99 = timings[int(len(timings) * 0.99) - 1] * 1e6 if timings else 0.0
        _say(f"{calls} sequential calls", f"p50 {p50:.0f} us, p99 {p99:.0f} us (same process)")

        await client.disconnect()
        await server.close()
    print("conduit demo:", "everything matched" if ok else "MISMATCH")
    return ok


def run(calls: int = 2000) -> int:
    """Run the demo under Trio; return the process exit code."""
    return 0 if trio.run(_demo, calls) else 1
