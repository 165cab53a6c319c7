"""Server push: a server sends a file to one chosen client as soon as it connects.

Run it: ``python push_to_client.py server`` in one terminal and
``python push_to_client.py client`` in another (from a directory that has a
``reports/monthly.pdf`` for the server to push).
"""

import asyncio
import sys

from conduit import Client, ClientDescriptor, FileTransferHandler, Server, ServerDescriptor

PORT = 8081


async def serve():
    server = Server(ServerDescriptor(host="127.0.0.1", port=PORT, password="secret"))
    transfer = FileTransferHandler(storage_dir="./server_files")
    transfer.register_server_handlers(server)

    @server.on_client_connect
    async def push_report(client):
        result = await transfer.send_to_client(server, client.id, "./reports/monthly.pdf")
        print(f"pushed to {client.id}: {result['success']}", flush=True)

    await server.run()


async def receive():
    client = Client(ClientDescriptor(server_host="127.0.0.1", server_port=PORT, password="secret"))
    transfer = FileTransferHandler(storage_dir="./inbox")
    transfer.register_client_handlers(client)
    received = asyncio.Event()

    @transfer.on_file_received
    async def on_file(filepath, metadata):
        print(
            f"got {metadata['filename']} ({metadata['size']} bytes, sha256 {metadata['checksum'][:12]}...)"
        )
        received.set()

    async with client:
        await asyncio.wait_for(received.wait(), 30)


asyncio.run(serve() if sys.argv[1:] == ["server"] else receive())
