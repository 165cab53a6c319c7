"""A conduit client written for asyncio: connects, calls, is called back, prints OK."""

import asyncio
import sys

from conduit import Client, ClientDescriptor

client = Client(
    ClientDescriptor(
        server_host="127.0.0.1",
        server_port=int(sys.argv[1]),
        password="s3cret",
        name="asyncio-client",
    )
)


@client.rpc
async def double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


async def main() -> None:
    async with client:
        results = await asyncio.gather(*(client.call("slow_add", a=i, b=i) for i in range(50)))
        assert results == [2 * i for i in range(50)], results
        assert (await client.rpc.call("slow_add", a=1, b=2)) == {"success": True, "data": 3}
        assert await client.call("ask_back") == 42
        print("OK", await client.call("whoami"), flush=True)


asyncio.run(main())
