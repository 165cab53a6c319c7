"""The guide's file_server.py, natively in Trio: same objects, trio.run instead of asyncio.run."""

import trio

from conduit import FileTransferHandler, Server, ServerDescriptor

server = Server(ServerDescriptor(port=8080, password="secret"))

transfer = FileTransferHandler(storage_dir="./server_files")
transfer.register_server_handlers(server)


@transfer.on_file_received
async def on_file(client, path, meta):
    # A Trio coroutine: under trio.run, handlers run in Trio and may use its APIs.
    print(f"Received {meta['filename']} ({meta['size']} bytes)")


trio.run(server.run)
