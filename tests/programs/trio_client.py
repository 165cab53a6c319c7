"""A conduit client written for Trio: connects, calls, is called back, prints OK."""

import sys

import trio
import trio.lowlevel

from conduit import Client, ClientDescriptor

client = Client(
    ClientDescriptor(
        server_host="127.0.0.1", server_port=int(sys.argv[1]), password="s3cret", name="trio-client"
    )
)


@client.rpc
async def double(x: int) -> int:
    await trio.lowlevel.checkpoint()
    return 2 * x


async def main() -> None:
    async with client:
        results = [0] * 50

        async def one(i: int) -> None:
            results[i] = await client.call("slow_add", a=i, b=i)

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
        assert results == [2 * i for i in range(50)], results
        assert await client.call("ask_back") == 42
        print("OK", await client.call("whoami"), flush=True)


trio.run(main)
