"""Testing an application built on conduit with pytest-trio: real sockets, a mock clock.

Run it as a user would: ``pytest examples/test_app_with_pytest_trio.py``
(pytest-trio installed). See docs/trio-and-asyncio.md, "Testing your
application".
"""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from conduit import Client, ClientDescriptor, FileTransferHandler, RPCTimeoutError, Server, ServerDescriptor

pytestmark = pytest.mark.trio

PASSWORD = "a password for tests only"


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Server]:
    # Port 0: a free port, read back from server.port once it listens.
    server = Server(ServerDescriptor(host="127.0.0.1", port=0, password=PASSWORD))

    @server.rpc
    async def add(a: int, b: int) -> int:
        return a + b

    @server.rpc
    async def slow() -> None:
        await trio.sleep(3600)

    FileTransferHandler(storage_dir=tmp_path / "stored").register_server_handlers(server)
    await nursery.start(server.run)
    yield server
    await server.close()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    descriptor = ClientDescriptor(
        server_host="127.0.0.1", server_port=server.port, password=PASSWORD, rpc_timeout=30
    )
    async with Client(descriptor) as client:
        yield client


async def test_add(client: Client) -> None:
    assert await client.call("add", a=2, b=3) == 5


async def test_upload(client: Client, tmp_path: Path) -> None:
    source = tmp_path / "hello.txt"
    source.write_text("hello")
    result = await FileTransferHandler(storage_dir=tmp_path / "mine").send_to_server(client, source)
    assert result["success"], result
    assert (tmp_path / "stored" / "hello.txt").read_text() == "hello"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Virtual time jumps ahead once every task has waited 20 ms of real time.
    # Not 0 (pytest-trio's autojump_clock): conduit does its password work and
    # file I/O in worker threads, and a task waiting for a thread counts as
    # waiting, so time would leap past every timeout while a thread works.
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_a_call_times_out(clock: trio.testing.MockClock, client: Client) -> None:
    with pytest.raises(RPCTimeoutError):
        await client.call("slow")  # rpc_timeout=30: 30 s of virtual time, in a moment
