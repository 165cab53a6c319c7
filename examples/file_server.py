import asyncio
from conduit import Server, ServerDescriptor, FileTransferHandler

server = Server(ServerDescriptor(
    port=8080,
    password="secret"
))

transfer = FileTransferHandler(storage_dir="./server_files")
transfer.register_server_handlers(server)

@transfer.on_file_received
async def on_file(client, path, meta):
    print(f"Received {meta['filename']} ({meta['size']} bytes)")
    # Process the file...

asyncio.run(server.run())
