"""A conduit server written for asyncio, as a user would: run by the tests as a program."""

import asyncio

from conduit import Peer, Server, ServerDescriptor

server = Server(
    ServerDescriptor(host="127.0.0.1", port=0, password="s3cret", name="asyncio-server")
)


@server.rpc
async def slow_add(a: int, b: int) -> int:
    await asyncio.sleep(0.01)  # an asyncio API, on the asyncio loop
    return a + b


@server.rpc
async def whoami(caller: Peer) -> str:
    return f"{caller.name} via {asyncio.get_running_loop().__class__.__name__}"


@server.rpc
async def ask_back(caller: Peer) -> int:
    doubled: int = await caller.call("double", x=21)
    return doubled


async def main() -> None:
    task = asyncio.create_task(server.run())
    port = await server.wait_listening()
    print(f"PORT {port}", flush=True)
    await task


asyncio.run(main())
