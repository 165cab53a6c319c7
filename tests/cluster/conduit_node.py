"""A conduit cluster node in its own process, for the multi-node tests and the benchmark.

Usage: ``python conduit_node.py CONFIG_JSON`` with ``cluster_url``,
``namespace``, ``node_name``, ``ttl``, ``staging`` (an ``s3://`` URL or null),
``storage`` (a directory or an ``s3://`` URL) and ``password``; the S3 endpoint and credentials
come from the AWS environment variables. Serves on 127.0.0.1 (a free port)
with a ``FileTransferHandler`` and three RPC methods a test drives it with:

* ``push(client_id, path, name)``: ``send_to_client`` from this node; the
  result dict (a raise becomes a failure dict, so the test sees its code);
* ``push_progress(client_id, path, name)``: the same, with ``on_progress``:
  ``{"result": ..., "reports": [TransferProgress.to_dict(), ...]}``;
* ``push_stopped(client_id, path, name)``: the same, with an ``on_progress``
  that raises at its first report: ``{"stopped": True}`` if the push raised it;
* ``broadcast(event, data, exclude)``: ``server.broadcast`` from this node;
* ``whoami()``: this node's name and the caller's client id.

Prints ``ready {"port": ..., "node": ...}`` once serving, then serves until
its standard input closes (a clean stop) or it is killed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import trio

from conduit import FileTransferHandler, Server, ServerDescriptor, current_peer
from conduit.errors import ConduitError, failure_dict
from conduit.transfer import TransferProgress


async def main(config: dict[str, Any]) -> None:
    server = Server(
        ServerDescriptor(
            host="127.0.0.1",
            port=0,
            password=config["password"],
            cluster_url=config["cluster_url"],
            cluster_namespace=config["namespace"],
            node_name=config["node_name"],
            cluster_ttl=float(config["ttl"]),
            cluster_staging=config.get("staging"),
        )
    )
    transfer = FileTransferHandler(storage_dir=config["storage"])
    transfer.register_server_handlers(server)

    @server.rpc
    async def push(client_id: str, path: str, name: str) -> dict[str, Any]:
        try:
            return await transfer.send_to_client(server, client_id, path, remote_name=name)
        except (ConduitError, OSError) as exc:
            return failure_dict(exc)

    @server.rpc
    async def push_progress(client_id: str, path: str, name: str) -> dict[str, Any]:
        reports: list[dict[str, Any]] = []

        def seen(progress: TransferProgress) -> None:
            reports.append(progress.to_dict())

        result = await transfer.send_to_client(
            server, client_id, path, on_progress=seen, remote_name=name
        )
        return {"result": result, "reports": reports}

    @server.rpc
    async def push_stopped(client_id: str, path: str, name: str) -> dict[str, Any]:
        class Stop(Exception):
            pass

        def stop(progress: TransferProgress) -> None:
            raise Stop

        try:
            result = await transfer.send_to_client(
                server, client_id, path, on_progress=stop, remote_name=name
            )
        except Stop:
            return {"stopped": True}
        return {"stopped": False, "result": result}

    @server.rpc
    async def broadcast(event: str, data: Any, exclude: list[str] | None = None) -> int:
        return await server.broadcast(event, data, exclude=exclude or ())

    @server.rpc
    async def whoami() -> dict[str, str]:
        assert server.cluster is not None
        return {"node": server.cluster.node_name, "client_id": current_peer().id}

    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        assert server.cluster is not None
        print("ready " + json.dumps({"port": port, "node": server.cluster.node_name}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        await server.close()


if __name__ == "__main__":
    trio.run(main, json.loads(sys.argv[1]))
