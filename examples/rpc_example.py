"""RPC both ways, messages and a broadcast, in one self-contained Trio program."""

import attrs
import trio

from conduit import Client, ClientDescriptor, Peer, Server, ServerDescriptor


@attrs.frozen
class Order:
    item: str
    quantity: int


server = Server(ServerDescriptor(host="127.0.0.1", port=0, password="secret"))


@server.rpc
async def place(order: Order, caller: Peer) -> dict:
    # Arguments arrive structured (an Order); the caller can be called back.
    confirmed = await caller.call("confirm", text=f"{order.quantity} x {order.item}?")
    return {"accepted": confirmed, "client": caller.id}


@server.on("chat")
async def chat(client: Peer, data: str) -> None:
    await server.broadcast("chat", f"{client.name}: {data}")


async def main():
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        client = Client(
            ClientDescriptor(
                server_host="127.0.0.1", server_port=port, password="secret", name="alice"
            )
        )
        heard = trio.Event()

        @client.rpc
        def confirm(text: str) -> bool:
            print("server asks:", text)
            return True

        @client.on("chat")
        def on_chat(data: str) -> None:
            print("chat:", data)
            heard.set()

        async with client:
            print(await client.rpc.call("place", order=Order("tea", 2)))
            await client.send("chat", "hello everyone")
            with trio.fail_after(5):
                await heard.wait()
        await server.close()


trio.run(main)
