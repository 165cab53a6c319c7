"""Start conduit cluster nodes as separate processes (``conduit_node.py``) and talk to them.

Shared by the multi-node tests and ``benchmarks/scenarios/cluster.py``: every
node is a real server process on 127.0.0.1, all on one SeaweedFS and one
Valkey. Stopping closes a node's standard input (a clean stop) and waits,
bounded, then kills it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from conduit import Client, ClientDescriptor, FileTransferHandler

NODE_PROGRAM = Path(__file__).with_name("conduit_node.py")
PASSWORD = "cluster-test-password"
#: Bound on a node process starting (imports, bus registration) on a loaded machine.
START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0


@attrs.define
class NodeProcess:
    """One running node: its process, port and name."""

    process: trio.Process
    name: str
    port: int = 0

    def kill(self) -> None:
        """``kill -9``: no goodbye, no unregistering."""
        self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        """A clean stop (its standard input closed): goodbyes, unregistering."""
        await _stop(self.process)


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise RuntimeError(f"node exited before it was ready: {data!r}")
        data += chunk
    return data


@contextlib.asynccontextmanager
async def node_processes(
    *,
    names: Sequence[str],
    bus_url: str,
    namespace: str,
    storage: Path,
    environment: dict[str, str],
    staging: str | None,
    ttl: float,
    shared_storage: str | None = None,
    storages: Mapping[str, str] | None = None,
) -> AsyncIterator[dict[str, NodeProcess]]:
    """Start one node process per name, wait until all serve, stop them afterwards.

    Each node stores in ``storage/<name>``, or all in ``shared_storage`` (an
    ``s3://`` URL) when given; ``storages[<name>]``, when given, wins for
    that node.
    """
    env = {**os.environ, **environment, "PYTHONPATH": os.pathsep.join(sys.path)}
    nodes: dict[str, NodeProcess] = {}
    try:
        for name in names:
            config = {
                "cluster_url": bus_url,
                "namespace": namespace,
                "node_name": name,
                "ttl": ttl,
                "staging": staging,
                "storage": (storages or {}).get(name, shared_storage or str(storage / name)),
                "password": PASSWORD,
            }
            process = await trio.lowlevel.open_process(
                [sys.executable, str(NODE_PROGRAM), json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            nodes[name] = NodeProcess(process, name)
        with trio.fail_after(START_TIMEOUT):
            for node in nodes.values():
                assert node.process.stdout is not None
                line = await _read_line(node.process.stdout)
                assert line.startswith(b"ready "), line
                info = json.loads(line[len(b"ready ") :])
                assert info["node"] == node.name
                node.port = int(info["port"])
        yield nodes
    finally:
        with trio.CancelScope(shield=True):
            for node in nodes.values():
                await _stop(node.process)


@contextlib.asynccontextmanager
async def engine_nodes(
    engines: Any,
    namespace: str,
    tmp_path: Path,
    names: Sequence[str],
    *,
    ttl: float,
    staging: str | None = None,
    shared_storage: str | None = None,
) -> AsyncIterator[dict[str, NodeProcess]]:
    """:func:`node_processes` on the test engines (``cluster_engines``): the bus,
    the S3 environment, and a local store per node under ``tmp_path`` unless
    ``shared_storage`` (an ``s3://`` URL) is given."""
    async with node_processes(
        names=names,
        bus_url=engines.bus.url,
        namespace=namespace,
        storage=tmp_path / "nodes",
        environment=engines.s3.environment(),
        staging=staging,
        ttl=ttl,
        shared_storage=shared_storage,
    ) as nodes:
        yield nodes


def random_file(path: Path, size: int) -> Path:
    """Write ``size`` random bytes to ``path`` and return it."""
    path.write_bytes(os.urandom(size))
    return path


async def _stop(process: trio.Process) -> None:
    if process.stdin is not None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await process.stdin.aclose()
    with trio.move_on_after(_STOP_TIMEOUT):
        await process.wait()
    if process.returncode is None:
        process.kill()
        with trio.move_on_after(_STOP_TIMEOUT):
            await process.wait()
    if process.stdout is not None:
        await process.stdout.aclose()


@attrs.define
class Receiver:
    """A client of one node that accepts pushes into ``inbox`` and records messages."""

    client: Client
    inbox: Path
    messages: list[tuple[str, Any]] = attrs.field(factory=list)
    _arrived: trio.Event = attrs.field(factory=trio.Event)

    def record(self, event: str, data: Any) -> None:
        """Keep one message and wake whoever waits for messages."""
        self.messages.append((event, data))
        self._arrived.set()
        self._arrived = trio.Event()

    async def wait_messages(self, count: int) -> None:
        """Until ``count`` messages have arrived (bound it with ``trio.fail_after``)."""
        while len(self.messages) < count:
            await self._arrived.wait()

    @property
    def id(self) -> str:
        """Its client id."""
        assert self.client.id is not None
        return self.client.id


@contextlib.asynccontextmanager
async def receiver(
    port: int, inbox: Path, events: Sequence[str] = (), **fields: Any
) -> AsyncIterator[Receiver]:
    """A connected client of the node on ``port``, recording the ``events`` it is sent.

    ``fields``: more ``ClientDescriptor`` settings (reconnect timing, say).
    """
    client = Client(
        ClientDescriptor(server_host="127.0.0.1", server_port=port, password=PASSWORD, **fields)
    )
    FileTransferHandler(storage_dir=inbox).register_client_handlers(client)
    found = Receiver(client, inbox)
    for event in events:
        client.on(event)(functools.partial(found.record, event))
    async with client:
        yield found
