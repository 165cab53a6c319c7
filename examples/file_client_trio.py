"""The guide's file_client.py, natively in Trio."""

import trio

from conduit import Client, ClientDescriptor, FileTransferHandler

client = Client(ClientDescriptor(server_host="localhost", server_port=8080, password="secret"))

transfer = FileTransferHandler()


async def main():
    async with client:  # connect() ... disconnect()
        result = await transfer.send_to_server(
            client,
            "my_document.pdf",
            on_progress=lambda p: print(f"\r{p.percent:.1f}%", end=""),
        )
        print(f"\nUploaded: {result}")


trio.run(main)
