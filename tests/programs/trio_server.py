"""A conduit server written for Trio: run by the tests as a program."""

import trio

from conduit import Peer, Server, ServerDescriptor

server = Server(ServerDescriptor(host="127.0.0.1", port=0, password="s3cret", name="trio-server"))


@server.rpc
async def slow_add(a: int, b: int) -> int:
    await trio.sleep(0.01)
    return a + b


@server.rpc
async def whoami(caller: Peer) -> str:
    return f"{caller.name} via trio"


@server.rpc
async def ask_back(caller: Peer) -> int:
    doubled: int = await caller.call("double", x=21)
    return doubled


async def main() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        print(f"PORT {port}", flush=True)


trio.run(main)
